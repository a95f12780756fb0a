"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that is itself a denoiser."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Denoiser


class ClassifierFreeGuidance(nn.Module):
    """x0_guided = x0_uncond + scale * (x0_cond - x0_uncond)  (= x0_cond + (scale - 1)(x0_cond - x0_uncond)).

    Args:
        denoiser: the conditional denoiser.
        scale: guidance weight w (1 = no guidance, returns the conditional prediction with one pass).
        uncond: the "null" conditioning (e.g. the empty-prompt embedding, or the label-dropout class); a callable
            ``uncond(cond) -> null_cond`` is accepted too, for conditions whose batch size varies.
    """

    def __init__(self, denoiser: Denoiser, scale: float, uncond: Any):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        x0_cond = self.denoiser(x, sigma, cond)
        if self.scale == 1.0:
            return x0_cond
        null = self.uncond(cond) if callable(self.uncond) else self.uncond
        x0_uncond = self.denoiser(x, sigma, null)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)
