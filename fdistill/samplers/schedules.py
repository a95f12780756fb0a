"""Noise-level (sigma) schedules for sampling, in VE / EDM sigma units (x = x0 + sigma * eps).

Every schedule returns ``num_steps + 1`` strictly decreasing sigmas: ``num_steps`` values from ``sigma_max`` down to
``sigma_min`` followed by a final 0 (``append_zero=True``, as in k-diffusion), or ``num_steps + 1`` values from
``sigma_max`` to ``sigma_min`` (``append_zero=False``). Either way a solver takes exactly ``num_steps`` steps.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..denoisers.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN


def karras_sigmas(num_points: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0) -> Tensor:
    """EDM schedule (Karras et al. 2022, Eq. 5): uniform in sigma^(1/rho); [num_points] float64, decreasing."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def logsnr_sigmas(num_points: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in lambda = -log sigma (half the log-SNR; DPM-Solver's "logSNR" steps); [num_points] float64."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_points, dtype=torch.float64).exp()


def time_uniform_sigmas(num_points: int, sigma_min: float, sigma_max: float, *, beta_min: float = 0.1,
                        beta_max: float = 20.0, alphas_cumprod: Tensor | None = None) -> Tensor:
    """Uniform in the time t of a variance-preserving (VP) process, converted to VE sigma = sqrt(1 - a) / sqrt(a).

    Without ``alphas_cumprod``: the continuous VP-SDE of Song et al. 2021 (App. B), linear beta(t) on t in [0, 1],
    alpha_bar(t) = exp(-beta_min t - beta_d t^2 / 2) with beta_d = beta_max - beta_min, so
    sigma(t) = sqrt(exp(beta_min t + beta_d t^2 / 2) - 1).
    With ``alphas_cumprod`` ([T] table of a discrete model, e.g. a Diffusers scheduler's): t is the (fractional)
    training timestep index; log sigma is interpolated linearly between table entries (k-diffusion convention).
    """
    if alphas_cumprod is not None:
        return _discrete_time_uniform(num_points, sigma_min, sigma_max, alphas_cumprod)
    beta_d = beta_max - beta_min
    if beta_min <= 0 or beta_d <= 0:
        raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")

    def time_of(sigma: float) -> float:   # inverse of sigma(t): root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)
        return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(sigma ** 2)) - beta_min) / beta_d

    t = torch.linspace(time_of(sigma_max), time_of(sigma_min), num_points, dtype=torch.float64)
    return torch.expm1(beta_min * t + 0.5 * beta_d * t ** 2).sqrt()


def _discrete_time_uniform(num_points: int, sigma_min: float, sigma_max: float, alphas_cumprod: Tensor) -> Tensor:
    """time_uniform for a table alphas_cumprod [T] (decreasing in t): uniform fractional indices, log-sigma interp."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().clamp(min=1e-12)  # zero-SNR end
    log_sigmas = (0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()).numpy()      # increasing in t
    if len(log_sigmas) < 2 or not (np.diff(log_sigmas) > 0).all():
        raise ValueError("time_uniform: alphas_cumprod must be a strictly decreasing table of >= 2 entries")
    lo, hi = math.exp(log_sigmas[0]), math.exp(log_sigmas[-1])
    if not lo * (1 - 1e-9) <= sigma_min < sigma_max <= hi * (1 + 1e-9):
        raise ValueError(f"time_uniform with alphas_cumprod: sigma_min={sigma_min}, sigma_max={sigma_max} must lie in "
                         f"the table's range [{lo:.6g}, {hi:.6g}]")
    index = np.arange(len(log_sigmas), dtype=np.float64)
    t_max, t_min = np.interp([math.log(sigma_max), math.log(sigma_min)], log_sigmas, index)
    t = np.linspace(t_max, t_min, num_points)
    return torch.from_numpy(np.interp(t, index, log_sigmas)).exp()


SIGMA_SCHEDULES = {"karras": karras_sigmas, "logsnr": logsnr_sigmas, "time_uniform": time_uniform_sigmas}


def sigmas(kind: str, num_steps: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX, *, append_zero: bool = True,
           dtype: torch.dtype = torch.float64, device: torch.device | str | None = None, **options) -> Tensor:
    """A decreasing 1-D tensor of noise levels for ``num_steps`` solver steps.

    Args:
        kind: "karras" (rho=7 by default, option ``rho``), "logsnr" (uniform in log sigma) or "time_uniform"
            (uniform in VP time; options ``beta_min``/``beta_max`` or ``alphas_cumprod``).
        num_steps: number of solver steps (>= 1); the result has num_steps + 1 entries.
        sigma_min, sigma_max: smallest non-zero and largest noise level, 0 < sigma_min < sigma_max.
        append_zero: end with sigma = 0 (the last step denoises to the data); otherwise end at sigma_min.
    Returns:
        [num_steps + 1] tensor in ``dtype`` (float64 default), strictly decreasing.
    """
    if kind not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule kind {kind!r}; allowed: {', '.join(SIGMA_SCHEDULES)}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    num_points = int(num_steps) + (0 if append_zero else 1)   # one step to zero starts at sigma_max
    values = SIGMA_SCHEDULES[kind](num_points, float(sigma_min), float(sigma_max), **options)
    if append_zero:
        values = torch.cat([values, values.new_zeros(1)])
    return values.to(dtype=dtype, device=device)
