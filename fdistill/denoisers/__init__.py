"""Everything is a denoiser in sigma units: ``D(x, sigma, cond) -> x0`` (see docs/architecture.md)."""
from .analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from .base import Denoiser, append_dims, as_sigma_batch, score_from_x0, x0_to_eps
from .guidance import ClassifierFreeGuidance

# Wrappers that import diffusers are loaded on first use, so importing the analytic denoisers stays fast.
_LAZY = {
    "DiffusersDenoiser": ".diffusers", "VPSchedule": ".diffusers", "X0_FROM_PREDICTION": ".diffusers",
    "EDMPrecond": ".edm", "edm_scalings": ".edm",
    "save_denoiser": ".io", "load_denoiser": ".io", "ModelInfo": ".io",
}

__all__ = [
    "Denoiser", "append_dims", "as_sigma_batch", "score_from_x0", "x0_to_eps",
    "GaussianMixtureDenoiser", "EmpiricalDenoiser", "ClassifierFreeGuidance", *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fdistill.denoisers' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
