"""The one protocol every model is seen through (EDM, Karras et al. 2022, Sec. 2):

    D(x, sigma, cond=None) -> x0_hat,    with x = x0 + sigma * eps   (variance-exploding form)

Samplers, losses and trainers talk only to this protocol; nothing outside the wrappers knows what a diffusers
timestep or ``prediction_type`` is.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

# The noise range of EDM (Karras et al. 2022, Sec. 5 / Table 1: sigma in [0.002, 80]): the default range of
# fdistill's networks, noise-level samplers and sampler schedules (one source).
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


@runtime_checkable
class Denoiser(Protocol):
    """x0-prediction in sigma units.

    Args:
        x: [B, *shape] noisy sample, x = x0 + sigma * eps.
        sigma: [B] noise level (standard deviation, data units), float.
        cond: optional conditioning (class labels [B] long, text embeddings, a dict for SDXL, ...).
    Returns:
        [B, *shape] estimate of E[x0 | x], float32 (float64 when x is float64 and the denoiser is analytic).
    """

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dimensions in total, for broadcasting per-sample scalars."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or [B] sigma to a [B] tensor on x's device, in x's floating dtype (at least float32)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(dtype)


def x0_to_eps(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x - x0) / sigma: the noise implied by an x0-prediction (sigma: [B], > 0)."""
    return (x - x0) / append_dims(sigma, x.ndim)


def score_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: grad_x log p_sigma(x) = (x0_hat - x) / sigma^2 (Efron 2011; EDM Eq. 3)."""
    return (x0 - x) / append_dims(sigma, x.ndim) ** 2


class LogSigmaTable(nn.Module):
    """A discrete schedule's training noise levels as an increasing buffer ``log_sigmas`` [T] (float64), set by the
    subclass (VP: 0.5 log((1 - abar) / abar); flow matching: log(t / (1 - t)))."""

    log_sigmas: Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_at(self, timesteps: Tensor) -> Tensor:
        """sigma of integer table indices [B] (float64)."""
        return self.log_sigmas[timesteps.long()].exp()
