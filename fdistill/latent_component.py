"""The interface a method holds to use a latent text-to-image model (by composition): prompts -> conditioning,
VAE encode / decode, the network as a denoiser, pipeline export. Implemented by
``fdistill.pipelines.StableDiffusionComponent`` (SD1.5 / SDXL) and ``fdistill.flow_pipelines.StableDiffusion3Component``
(SD3, rectified flow), so nothing here names a UNet, a CLIP encoder or a VP schedule."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class LatentDiffusionComponent(Protocol):
    """What a method needs of a latent text-to-image model, whatever its family: the interface methods hold (by
    composition) instead of touching pipeline parts. ``StableDiffusionComponent`` implements it for SD1.5 / SDXL
    (CLIP encoders, UNet, VP scheduler); a flow-matching pipeline (SD3 / Flux: T5 + CLIP encoders, a transformer,
    ``FlowMatchEulerDiscreteScheduler``) is another implementation with the same methods.

    The denoising network (UNet / transformer) is NOT part of the state a method reads from the component: a method
    trains its own copy (possibly wrapped or sharded), so every call that runs it takes the network as ``net``.
    Conditioning is a dict of the network's keyword arguments besides sample and timestep (``DiffusersDenoiser``'s
    ``cond``); latents are in the scaled space the network sees; images are [B, 3, H, W] in [-1, 1].
    """

    kind: str                       # the family, e.g. "sd15", "sdxl"
    image_size: tuple[int, int]     # (H, W) in pixels of training and generation
    scheduler: Any                  # the training scheduler (its config defines the noise schedule)
    source: str | None              # hub id or directory loaded from (None in memory): a LoRA's base model
    input_scaling: str              # "vp" / "flow": the scale of a generator's input noise at which the network
                                    # sees the pipelines' pure noise z (methods.fdistill GENERATOR_INPUT_SCALES)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen parts by name (VAE, text encoders), for a method's frozen networks."""

    def conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Network conditioning of ``captions``; ``batch`` (the data batch they come from) supplies per-image
        conditioning where the family has one (SDXL: original size and crop), else the defaults for image_size."""

    def conditioning_tensors(self, cond: dict[str, Any]) -> dict[str, Tensor]:
        """``cond`` as a flat dict of [B, ...] tensors (to cache); ``conditioning_from_tensors`` inverts it."""

    def conditioning_from_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """The conditioning dict from ``conditioning_tensors``' output (a cached batch; other keys are ignored)."""

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        """Images -> latents (posterior mean, or a draw with ``sample``); ``decode`` inverts it."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images, float32."""

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of ``batch`` latents of image_size: the shape of the initial noise of a sampler."""

    def denoiser(self, net: nn.Module) -> nn.Module:
        """``net`` as a ``fdistill.denoisers.Denoiser`` (x0 in sigma units, no null condition): training."""

    def schedule_shift(self) -> float | None:
        """The scheduler's resolution-dependent shift at image_size (Flux's mu), None where it has none."""

    def sampling_denoiser(self, net: nn.Module, guidance: float = 1.0) -> nn.Module:
        """``denoiser(net)`` with the empty prompt as null condition and classifier-free guidance ``guidance``."""

    def pipeline(self, net: nn.Module | None = None, scheduler: Any = None):
        """The Diffusers pipeline of the parts, with another network or scheduler if given."""

    def save_pipeline(self, directory: str | Path, net: nn.Module | None = None, scheduler: Any = None) -> None:
        """Write ``pipeline(net, scheduler)`` as a directory that ``from_pretrained`` loads."""

    def generator_export(self, sigmas: tuple[float, ...]) -> tuple[Any, dict[str, Any]]:
        """(scheduler, fdistill.json fields incl. "diffusers_call") with which the pipeline generates like a one- /
        few-step generator at noise levels ``sigmas``; ValueError for levels the pipeline cannot take."""

    def save_lora(self, directory: str | Path, net: nn.Module) -> None:
        """Write the PEFT adapters of ``net`` in Diffusers format (``pipe.load_lora_weights(directory)``)."""


def latent_component(parts: Any, image_size: tuple[int, int]):
    """The ``LatentDiffusionComponent`` of pipeline parts: ``StableDiffusionComponent`` for ``SDComponents``,
    ``fdistill.flow_pipelines.StableDiffusion3Component`` / ``FluxComponent`` for ``SD3Components`` / ``FluxComponents``."""
    from .flow_pipelines import FluxComponent, FluxComponents, SD3Components, StableDiffusion3Component
    from .pipelines import SDComponents, StableDiffusionComponent

    if isinstance(parts, SDComponents):
        return StableDiffusionComponent(parts, image_size)
    if isinstance(parts, SD3Components):
        return StableDiffusion3Component(parts, image_size)
    if isinstance(parts, FluxComponents):
        return FluxComponent(parts, image_size)
    raise TypeError(f"no latent component for {type(parts).__name__}; supported: SDComponents, SD3Components, "
                    "FluxComponents")
