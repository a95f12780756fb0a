"""f-distill losses (Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching",
arXiv 2502.15681). Pure functions of tensors; per-sample values out, hyper-parameters as plain floats.

The gradient of D_f(p_data || q_student) with respect to a generated sample x (paper Sec. 3, Theorem 1) is the
reverse-KL (DMD / VSD) score difference weighted per sample by h(r) = f''(r) r^2, with r = p_sigma(x_t) / q_sigma(x_t)
the density ratio of the noisy marginals. In denoiser units s_fake - s_teacher = (x0_fake - x0_teacher) / sigma^2,
the 1 / sigma^2 being replaced by DMD2's per-sample normaliser (Yin et al. 2024, "Improved Distribution Matching Distillation").
The ratio comes from a GAN discriminator trained with real data positive: at its optimum logit = log(p / q).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers.base import append_dims


def _constant_one(r: Tensor) -> Tensor:
    return torch.ones_like(r)


# h(r) = f''(r) r^2 up to a positive constant (paper Table 1); constants vanish in the batch-mean renormalisation.
F_DIVERGENCE_WEIGHTS: dict[str, Callable[[Tensor], Tensor]] = {
    "rkl": _constant_one,                    # reverse KL, f = -log r: h = 1 (DMD2 / VSD)
    "kl": lambda r: r,                       # forward KL, f = r log r
    "js": lambda r: r / (1 + r),             # Jensen-Shannon
    "sf": lambda r: 1 / (1 + r),             # softened reverse KL
    "sh": torch.sqrt,                        # squared Hellinger
    "jf": lambda r: 1 + r,                   # Jeffreys (forward + reverse KL)
    "neyman": lambda r: 1 / r,               # Neyman chi^2
}
DIVERGENCES: tuple[str, ...] = tuple(F_DIVERGENCE_WEIGHTS)


def check_divergence(name: str) -> str:
    """Return ``name`` if it is a known f-divergence, else raise ValueError listing the seven names."""
    if name not in F_DIVERGENCE_WEIGHTS:
        raise ValueError(f"unknown f-divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    return name


def f_divergence_weight(r: Tensor, name: str) -> Tensor:
    """h(r) = f''(r) r^2 (paper Theorem 1 and Table 1): the per-sample weight of the score difference.

    Args:
        r: [B] density ratios p / q (> 0).
        name: one of DIVERGENCES.
    Returns:
        [B] weights, same dtype as r (always a per-sample tensor, also for 'rkl').
    """
    return F_DIVERGENCE_WEIGHTS[check_divergence(name)](r)


def density_ratio(logit: Tensor, logit_clamp: float = 10.0, ratio_min: float = 0.1, ratio_max: float = 20.0) -> Tensor:
    """r = exp(clamp(logit, -c, c)) clamped to [ratio_min, ratio_max], detached, float32 ([B] -> [B]).

    At the discriminator's optimum logit = log(p_data / q_student) (paper Sec. 3.2); the clamps keep the weights of
    outliers bounded early in training, when the discriminator is far from optimal."""
    logit = logit.detach().float().clamp(-logit_clamp, logit_clamp)
    return logit.exp().clamp(ratio_min, ratio_max)


def noise_level_bins(quantile: Tensor, num_bins: int) -> Tensor:
    """Bin index in [0, num_bins) of each sample from the CDF value of its sigma under the sampling distribution.

    Binning by the quantile makes the bins equally populated in expectation, whatever the sigma distribution
    (binning linearly in sigma puts most EDM samples into the first bin).
    Args: quantile [B] in [0, 1]. Returns: [B] long.
    """
    return (quantile * num_bins).long().clamp(0, num_bins - 1)


def binned_sums(values: Tensor, bins: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Per-bin sum of ``values`` and per-bin count, both [num_bins] float64 (so they can be all-reduced and divided)."""
    sums = torch.zeros(num_bins, dtype=torch.float64, device=values.device).index_add_(0, bins, values.double())
    counts = torch.zeros(num_bins, dtype=torch.float64, device=values.device).index_add_(
        0, bins, torch.ones_like(values, dtype=torch.float64))
    return sums, counts


def dmd_gradient(x: Tensor, x0_fake: Tensor, x0_teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """DMD2's normalised distribution-matching gradient g = (x0_fake - x0_teacher) / (mean |x - x0_teacher| + eps).

    Args:
        x: [B, ...] clean student samples (the point the gradient is taken at).
        x0_fake, x0_teacher: [B, ...] x0-predictions of the fake score and of the (guided) teacher at x + sigma * eps.
    Returns:
        [B, ...] the gradient of the reverse KL wrt x up to a per-sample positive factor, float32.
    """
    x, x0_fake, x0_teacher = x.float(), x0_fake.float(), x0_teacher.float()
    normaliser = (x - x0_teacher).abs().flatten(1).mean(1)
    return (x0_fake - x0_teacher) / append_dims(normaliser + eps, x.ndim)


def fdistill_generator_loss(x: Tensor, x0_fake: Tensor, x0_teacher: Tensor, weight: Tensor,
                            eps: float = 1e-8) -> Tensor:
    """Per-sample f-distill student loss 0.5 * mean_elements (x - stopgrad(x - h * g))^2 (paper Sec. 3.3 with DMD2's g).

    Its gradient wrt x is h * g / numel(x[0]) per sample; the mean over elements (as DMD2's mse_loss) keeps the
    GAN weight on the paper's scale.
    Args:
        x: [B, ...] student samples, with grad.
        x0_fake, x0_teacher: [B, ...] targets (no grad needed; detached here).
        weight: [B] h(r), normalised to mean 1 over the global batch (detached here).
    Returns: [B] float32.
    """
    grad = append_dims(weight.detach().float(), x.ndim) * dmd_gradient(x.detach(), x0_fake.detach(), x0_teacher.detach(), eps)
    target = (x.float() - grad).detach()
    return 0.5 * (x.float() - target).pow(2).flatten(1).mean(1)


def generator_gan_loss(fake_logit: Tensor) -> Tensor:
    """Non-saturating generator GAN loss softplus(-logit) = -log sigmoid(logit), [B] -> [B] (paper Sec. 3.2, as DMD2)."""
    return F.softplus(-fake_logit.float())


def discriminator_loss(real_logit: Tensor, fake_logit: Tensor) -> Tensor:
    """Discriminator loss softplus(fake_logit) + softplus(-real_logit), [B] each -> [B] (real data positive; paper Sec. 3.2).

    Its optimum is logit = log(p_data / q_student) at every noisy x (Goodfellow et al. 2014, Prop. 1)."""
    return F.softplus(fake_logit.float()) + F.softplus(-real_logit.float())


__all__ = [
    "F_DIVERGENCE_WEIGHTS", "DIVERGENCES", "check_divergence", "f_divergence_weight", "density_ratio",
    "noise_level_bins", "binned_sums", "dmd_gradient", "fdistill_generator_loss", "generator_gan_loss",
    "discriminator_loss",
]
