"""The data-dependent parts of f-distill (its "domain"): what a sample, a condition and a real sample are, how
samples are decoded to data and how the student is exported. ``PixelDomain``: data space, optionally with class
labels; ``text.TextToImageDomain``: Stable Diffusion latents with prompts."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .config import FDistillConfig


class Domain(Protocol):
    """What ``FDistill`` asks of its data.

    Attributes:
        sample_shape: shape of one sample the student generates ([C, H, W], [C, h, w] latents, or [D]).
        num_classes: classes of the batches' labels (0 = none).
        input_scaling: how the student's input noise z is scaled at sigma_g: "ve" (sigma_g z), "vp" (sqrt(1 +
            sigma_g^2) z) or "flow" ((1 + sigma_g) z) (``method.GENERATOR_INPUT_SCALES``).
        prompts: prompts of sample grids (text-to-image), else None.
    """

    sample_shape: tuple[int, ...]
    num_classes: int
    input_scaling: str
    prompts: list[str] | None

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen networks the domain needs (VAE, text encoders), registered in ``method.frozen``."""

    def default_generator_sigma(self, config: FDistillConfig, teacher: nn.Module) -> float:
        """sigma_g of a one-step student when the config sets none."""

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> Any:
        """The condition of a training batch, passed to every network call."""

    def real_samples(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The discriminator's real samples [B, *sample_shape] of a batch, None when it has none."""

    def generation_condition(self, num: int, cond: Any, device: torch.device) -> Any:
        """The condition of ``num`` generated samples from a user condition (None: the domain's default)."""

    def decode(self, x: Tensor) -> Tensor:
        """Student output [B, *sample_shape] -> samples in data space (images in [-1, 1])."""

    def export(self, student: nn.Module, directory: str, generator_sigmas: tuple[float, ...],
               noise_scale: float) -> None:
        """Write the student as a generator model directory."""


class PixelDomain:
    """Samples [B, *sample_shape] in data space (images [C, H, W] in [-1, 1], or vectors [D]); the condition is the
    batch's ``"label"`` [B] when ``num_classes`` > 0. The student is a VE generator (its input is sigma_g z).

    Args:
        sample_shape: shape of one sample.
        num_classes: classes of the batches' labels (0 = unconditional).
    """

    input_scaling = "ve"
    prompts = None

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0):
        self.sample_shape = tuple(sample_shape)
        self.num_classes = int(num_classes)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}

    def default_generator_sigma(self, config: FDistillConfig, teacher: nn.Module) -> float:
        """sigma_g when the config sets none: the top of the sampled noise range."""
        return config.sigma_max

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The class labels [B] of a batch when the data is labelled, else None."""
        label = batch.get("label") if self.num_classes else None
        return None if label is None else label.to(device)

    def real_samples(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The discriminator's real samples [B, *sample_shape] of a batch (its ``"x"``), None when it has none."""
        return batch["x"].to(device) if "x" in batch else None

    def generation_condition(self, num: int, cond: Any, device: torch.device) -> Any:
        """``cond`` if given, else classes 0 .. num_classes - 1 in turn when the data is labelled, else None."""
        if cond is None and self.num_classes:
            return torch.arange(num, device=device) % self.num_classes
        return cond

    def decode(self, x: Tensor) -> Tensor:
        """Student output -> samples in float32; images are clamped to [-1, 1]."""
        x = x.float()
        return x.clamp(-1, 1) if x.ndim == 4 else x

    def export(self, student: nn.Module, directory: str, generator_sigmas: tuple[float, ...],
               noise_scale: float) -> None:
        """The student as a generator model directory (``fdistill.denoisers.save_denoiser``)."""
        from ...denoisers.io import save_denoiser

        save_denoiser(student, directory, kind="generator", generator_sigmas=generator_sigmas,
                      generator_noise_scale=noise_scale)
