"""Everything is a denoiser in sigma units: ``D(x, sigma, cond) -> x0`` (see DESIGN.md)."""
from .analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from .base import Denoiser, append_dims, as_sigma_batch, score_from_x0, x0_to_eps
from .guidance import ClassifierFreeGuidance

__all__ = [
    "Denoiser", "append_dims", "as_sigma_batch", "score_from_x0", "x0_to_eps",
    "GaussianMixtureDenoiser", "EmpiricalDenoiser", "ClassifierFreeGuidance",
]
