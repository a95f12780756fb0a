"""fdistill: one-step distillation (f-distill), DDO, Diffusion-DPO, DPM-Solver samplers and FID for Diffusers models."""

__version__ = "0.1.0"
