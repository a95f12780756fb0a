"""One objective per method (fdistill, ddo, diffusion_dpo, denoising); the trainer is in ``fdistill.training``."""
from .base import Method, Phase, StepContext

__all__ = ["Method", "Phase", "StepContext"]
