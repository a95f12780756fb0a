"""Denoising (score-matching) losses in sigma units, for training teachers (EDM, Karras et al. 2022).

All of them are a weighted x0 regression  lambda(sigma) * ||D(x0 + sigma * n, sigma) - x0||^2  (EDM Eq. 2 / Eq. 8):
the epsilon and v losses of VP models are the same regression with another weight, because in sigma units
eps_hat - eps = -(x0_hat - x0) / sigma and, with alpha = 1 / sqrt(1 + sigma^2), v_hat - v = -(x0_hat - x0) *
sqrt(1 + sigma^2) / sigma. So a loss never needs to know a Diffusers timestep or prediction_type.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..denoisers.base import append_dims


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM Eq. 8 / Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (unit loss at init)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def epsilon_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """||eps_hat - eps||^2 = ||x0_hat - x0||^2 / sigma^2 (DDPM's simple loss, Ho et al. 2020 Eq. 14)."""
    return sigma ** -2


def v_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """||v_hat - v||^2 = ||x0_hat - x0||^2 (1 + sigma^2) / sigma^2 (v-prediction, Salimans & Ho 2022, Sec. 4)."""
    return (1 + sigma ** 2) / sigma ** 2


def flow_velocity_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """||v_hat - v||^2 = ||x0_hat - x0||^2 / t^2 = ||x0_hat - x0||^2 (1 + sigma)^2 / sigma^2 (rectified flow, v =
    eps - x0 at x_t = (1 - t) x0 + t eps, t = sigma / (1 + sigma); Esser et al. 2024, Eq. 3)."""
    return (1 + sigma) ** 2 / sigma ** 2


def x0_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """Plain x0 regression, lambda = 1."""
    return torch.ones_like(sigma)


LOSS_WEIGHTS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "edm": edm_weight, "epsilon": epsilon_weight, "v_prediction": v_weight, "x0": x0_weight,
    "flow_velocity": flow_velocity_weight,
}


def lognormal_sigmas(num: int, p_mean: float, p_std: float, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """EDM's training noise levels (Sec. 5, Table 1): ln(sigma) ~ N(P_mean, P_std^2); returns [num] float32."""
    return (p_mean + p_std * torch.randn(num, generator=generator, device=device)).exp()


def table_sigmas(num: int, table: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform draws from a discrete table of sigmas ([T], e.g. a VP model's training timesteps t ~ U{0..T-1});
    returns [num] on the table's device."""
    index = torch.randint(len(table), (num,), generator=generator, device=table.device)
    return table[index].float()


# Quantile samplers: u ~ U[0, 1) -> sigma, monotone increasing (u is the CDF value of sigma under the distribution),
# so binning u bins noise levels by quantile (f-distill's per-noise-level ratio normalisation).

def karras_uniform_sigmas(u: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma^(1/rho) uniform between sigma_min^(1/rho) and sigma_max^(1/rho): a uniform position on the EDM
    sampling schedule (Karras et al. 2022, Eq. 5), as DMD2 draws timesteps uniformly. u [B] -> sigma [B]."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + u * (hi - lo)) ** rho


def loguniform_sigmas(u: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """log sigma uniform on [log sigma_min, log sigma_max]. u [B] -> sigma [B]."""
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def truncated_lognormal_sigmas(u: Tensor, p_mean: float, p_std: float, sigma_min: float, sigma_max: float) -> Tensor:
    """EDM's training distribution ln(sigma) ~ N(P_mean, P_std^2) (Sec. 5, Table 1) truncated to [sigma_min,
    sigma_max], by inverse CDF: sigma = exp(Phi^-1(Phi(a) + u (Phi(b) - Phi(a)))) with a, b = ln sigma_min,
    ln sigma_max and Phi the CDF of N(P_mean, P_std^2). u [B] -> sigma [B] in u's dtype."""
    normal = torch.distributions.Normal(torch.tensor(p_mean, dtype=u.dtype), torch.tensor(p_std, dtype=u.dtype))
    lo, hi = (normal.cdf(torch.tensor(math.log(s), dtype=u.dtype)) for s in (sigma_min, sigma_max))
    return normal.icdf((lo + u * (hi - lo)).clamp(1e-7, 1 - 1e-7)).exp()


def time_uniform_sigmas(u: Tensor, table: Tensor, t_min: float = 0.001, t_max: float = 0.999) -> Tensor:
    """Noise levels of a discrete VP schedule at a time t uniform in [t_min, t_max], from quantiles u.

    t is in units of the whole schedule (t = 1 is timestep T); the noise level is that of timestep floor(T t), the
    training timestep the network saw. This is FastGen's uniform time distribution on a Diffusers alphas_cumprod
    schedule (t in [0.001, 0.999] in its SD1.5 / SDXL f-distill and DMD2 recipes), and DMD2's integer-timestep draw.

    Args:
        u: [B] quantiles in [0, 1); sigma is non-decreasing in u, so binning u bins by quantile.
        table: [T] sigma of the integer timesteps 0..T-1 (increasing), e.g. ``DiffusersDenoiser.train_sigmas``.
        t_min, t_max: the range of t, 0 <= t_min < t_max <= 1.
    Returns:
        [B] float32 sigmas, on the table's device.
    """
    t = t_min + u.to(table.device, torch.float64) * (t_max - t_min)
    index = torch.floor(t * len(table)).long().clamp(0, len(table) - 1)
    return table[index].float()


def weighted_denoising_loss(x0_hat: Tensor, x0: Tensor, sigma: Tensor, weighting: str = "edm",
                            sigma_data: float = 0.5) -> Tensor:
    """Per-sample loss [B]: lambda(sigma) * mean over the non-batch dims of (x0_hat - x0)^2, in float32.

    Args:
        x0_hat: [B, ...] denoiser output; x0: [B, ...] clean data; sigma: [B] noise levels (> 0).
        weighting: a key of LOSS_WEIGHTS ('edm', 'epsilon', 'v_prediction', 'x0').
        sigma_data: data standard deviation for the EDM weight.
    """
    if weighting not in LOSS_WEIGHTS:
        raise ValueError(f"weighting must be one of {sorted(LOSS_WEIGHTS)}, got {weighting!r}")
    squared = (x0_hat.float() - x0.float()) ** 2
    per_sample = squared.reshape(squared.shape[0], -1).mean(dim=1)
    return LOSS_WEIGHTS[weighting](sigma.float(), sigma_data) * per_sample


def noisy_sample(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x = x0 + sigma * n (the VE forward process of the denoiser protocol); sigma [B]."""
    return x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
