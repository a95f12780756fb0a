"""Direct Discriminative Optimization (DDO; Zheng et al. 2025, arXiv 2503.01103) for diffusion models.

DDO reads a likelihood model as an implicit GAN discriminator: d(x) = beta * log(p_theta(x) / p_ref(x)), with
p_ref the frozen pre-trained model. For diffusion models the log ratio is estimated per sample from the gap of
the two denoising errors at one shared noise level and noise draw (the paper's diffusion instantiation, Sec. 3;
equation numbers of the arXiv version are quoted from memory and unverified).

What the estimate means. For VE noise, x_n = x + sigma * eps, and exact denoisers D_p, D_q of densities p, q,

    log p(x) - log q(x) = int_0^inf  E_eps[ ||D_q(x_n) - x||^2 - ||D_p(x_n) - x||^2 ]  sigma^-3  dsigma   (*)

(the continuous-time ELBO, whose gap is zero for exact denoisers: Song et al. 2021, Thm. 1; Kingma et al. 2021,
Eq. 17 with SNR = 1 / sigma^2). DDO samples sigma from the EDM log-normal p(sigma) and weights by the EDM weight
lambda(sigma), so its expectation is int p(sigma) lambda(sigma) E_eps[gap] dsigma: the integrand of (*) reweighted
by w(sigma) = p(sigma) lambda(sigma) sigma^3. It is an exact log ratio only where w is constant, i.e. it is a
sigma-reweighted log ratio; it is 0 exactly when the two denoisers agree. The tests check both facts by quadrature.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoisers.base import append_dims
from .denoising import edm_weight, lognormal_sigmas

Denoise = Callable[[Tensor, Tensor, Any], Tensor]


def ddo_log_ratio_from_outputs(x: Tensor, x0_model: Tensor, x0_reference: Tensor, sigma: Tensor,
                               sigma_data: float = 0.5) -> Tensor:
    """The math core of the DDO log-ratio estimate, one sigma per sample:

        Delta = lambda(sigma) * sum_{C,H,W} ( (D_ref(x_n) - x)^2 - (D_theta(x_n) - x)^2 )

    with lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, EDM's loss weight (Karras et al. 2022,
    Eq. 8). A sum over elements, not a mean: beta's range [0.01, 0.1] assumes it.

    Args:
        x: [B, *shape] clean samples.
        x0_model, x0_reference: [B, *shape] the two denoisers' outputs at the same x_n = x + sigma * eps.
        sigma: [B] noise levels.
        sigma_data: data standard deviation in lambda (0.5 for images in [-1, 1]).
    Returns:
        [B] estimate of log p_theta(x) - log p_ref(x) (up to the sigma reweighting explained in the module doc).
    """
    gap = (x0_reference - x) ** 2 - (x0_model - x) ** 2
    return edm_weight(sigma, sigma_data) * gap.flatten(1).sum(1)


@contextlib.contextmanager
def likelihood_mode(*denoisers: Any) -> Iterator[None]:
    """Dropout off (eval mode) and autocast off (fp32) for the likelihood estimate; restores the training flags after.
    Non-module denoisers (plain callables) pass through."""
    modules = [d for d in denoisers if isinstance(d, nn.Module)]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if device_type == "cpu" or torch.cuda.is_available():
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)


def ddo_log_ratio(model: Denoise, reference: Denoise, x: Tensor, cond: Any = None, num_draws: int = 1,
                  p_mean: float = -0.4, p_std: float = 1.0, sigma_data: float = 0.5,
                  generator: torch.Generator | None = None) -> Tensor:
    """Per-sample estimate of log p_theta(x) - log p_ref(x) from denoising errors (DDO's diffusion instantiation).

    Each draw picks one sigma per sample from the EDM log-normal and ONE noise draw shared by model and reference
    (shared noise makes Delta exactly 0 when theta = ref and cuts its variance). The reference runs under no_grad;
    both run in eval mode (no dropout) and in float32 with autocast disabled. ``num_draws`` draws are averaged.

    Args:
        model: trainable denoiser D_theta(x, sigma, cond) (gradients flow through it).
        reference: frozen denoiser D_ref.
        x: [B, *shape] clean samples (data or fakes).
        cond: optional conditioning passed to both denoisers (e.g. labels [B]).
        num_draws: number of (sigma, noise) draws averaged (>= 1).
        p_mean, p_std: EDM log-normal of sigma.
        sigma_data: data standard deviation in the EDM weight.
        generator: optional torch.Generator for the sigma and noise draws.
    Returns:
        [B] log-ratio estimates, float32 (float64 if x is float64).
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    draws = []
    with likelihood_mode(model, reference):
        for _ in range(num_draws):
            sigma = lognormal_sigmas(x.shape[0], p_mean, p_std, generator, x.device).to(x.dtype)
            x_noisy = x + append_dims(sigma, x.ndim) * torch.randn(x.shape, device=x.device, dtype=x.dtype,
                                                                   generator=generator)
            with torch.no_grad():
                x0_reference = reference(x_noisy, sigma, cond).to(x.dtype)
            x0_model = model(x_noisy, sigma, cond).to(x.dtype)
            draws.append(ddo_log_ratio_from_outputs(x, x0_model, x0_reference, sigma, sigma_data))
    return torch.stack(draws).mean(0)


def ddo_loss(log_ratio_real: Tensor, log_ratio_fake: Tensor, alpha: float = 1.0, beta: float = 0.02) -> Tensor:
    """The DDO objective (Zheng et al. 2025, Sec. 3, Eq. 7 with the alpha / beta generalisation; numbering unverified):

        L = - E_{x ~ p_data} log sigmoid(beta * Delta(x))  -  alpha * E_{x ~ p_ref} log sigmoid(-beta * Delta(x))

    with Delta the estimated log p_theta / p_ref. At theta = ref (Delta = 0) it is (1 + alpha) log 2.

    Args:
        log_ratio_real: [B_real] Delta on data samples.
        log_ratio_fake: [B_fake] Delta on samples of the reference model.
        alpha: weight of the fake term (paper range [0.5, 6]).
        beta: discriminator temperature (paper range [0.01, 0.1]).
    Returns:
        scalar loss.
    """
    real_term = -F.logsigmoid(beta * log_ratio_real).mean()
    fake_term = -F.logsigmoid(-beta * log_ratio_fake).mean()
    return real_term + alpha * fake_term
