"""Stable Diffusion 3 (rectified-flow transformer) as a ``fdistill.latent_component.LatentDiffusionComponent``:
load its parts, encode prompts as ``StableDiffusion3Pipeline`` does, rebuild the pipeline (tiny SD3 / Flux built
from config: ``fdistill.tiny_flow``).

SD3 conditioning (Esser et al. 2024, Sec. 4 and Fig. 2; Diffusers ``StableDiffusion3Pipeline.encode_prompt``):
``encoder_hidden_states`` = [CLIP-L and CLIP-G penultimate states concatenated along features, zero-padded to the T5
width ; T5-XXL states] along the sequence, [B, 77 + L_t5, 4096]; ``pooled_projections`` = both CLIP pooled
projections concatenated, [B, 768 + 1280]. Without a T5 encoder (``text_encoder_3=None``) its states are zeros.
The prompts are encoded by the pipeline's own ``encode_prompt``, so training and the exported pipeline agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers.flow import flux_mu
from .export_schedulers import flow_generator_scheduler
from .pipelines import as_torch_dtype, decode_latents, encode_latents, vae_scale_factor

SD3_MAX_SEQUENCE_LENGTH = 256       # StableDiffusion3Pipeline's default T5 sequence length


@dataclass
class FlowTransformerParts:
    """What the SD3 and Flux parts share: a transformer, a VAE, two text encoders with their tokenizers and a
    flow-matching scheduler; ``unet`` names the transformer as the Stable Diffusion code paths expect."""

    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    text_encoder_2: nn.Module
    tokenizer_2: Any
    scheduler: Any

    @property
    def unet(self) -> nn.Module:
        """The denoising network, under the name the Stable Diffusion code paths use."""
        return self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)


@dataclass
class SD3Components(FlowTransformerParts):
    """The parts of a Stable Diffusion 3 pipeline (``text_encoder_3`` / ``tokenizer_3`` = T5, may be None)."""

    text_encoder_3: nn.Module | None = None
    tokenizer_3: Any = None
    source: str | None = None
    kind = "sd3"

    @property
    def image_size(self) -> tuple[int, int]:
        side = int(self.transformer.config.sample_size) * self.vae_scale_factor
        return side, side

    def text_encoders(self) -> dict[str, nn.Module]:
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder_3 is not None:
            encoders["text_encoder_3"] = self.text_encoder_3
        return encoders


def load_sd3_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                        torch_dtype: torch.dtype | str | None = None) -> SD3Components:
    """The parts of a Diffusers SD3 pipeline (hub id, e.g. "stabilityai/stable-diffusion-3-medium-diffusers", or
    directory); the transformer in float32, the frozen VAE / encoders in ``torch_dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    common = {"revision": revision, "variant": variant}
    frozen = dict(common, torch_dtype=as_torch_dtype(torch_dtype))
    local = Path(pretrained).exists()
    return SD3Components(
        transformer=SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", **common),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **frozen),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder", **frozen),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", **frozen),
        text_encoder_3=T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3", **frozen),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision),
        tokenizer_2=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision),
        tokenizer_3=T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3", revision=revision),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler",
                                                                  revision=revision),
        source=str(Path(pretrained).resolve()) if local else str(pretrained))


def frozen_parts_in(parts: Any, torch_dtype: torch.dtype | str | None) -> Any:
    """``parts`` with the VAE and text encoders cast to ``torch_dtype`` (None: unchanged)."""
    dtype = as_torch_dtype(torch_dtype)
    if dtype is not None:
        for module in (parts.vae, *parts.text_encoders().values()):
            module.to(dtype)
    return parts


FLUX_MAX_SEQUENCE_LENGTH = 512     # FluxPipeline's default T5 sequence length
FLUX_GUIDANCE = 3.5                # FluxPipeline's default (embedded) guidance


@dataclass
class FluxComponents(FlowTransformerParts):
    """The parts of a Flux pipeline: CLIP-L (pooled embedding) as ``text_encoder``, T5-XXL as ``text_encoder_2``."""

    source: str | None = None
    resolution: int = 1024      # training / generation size in pixels: Flux's transformer config has none
    kind = "flux"

    @property
    def image_size(self) -> tuple[int, int]:
        return self.resolution, self.resolution

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def load_flux_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                         torch_dtype: torch.dtype | str | None = None, resolution: int = 1024) -> FluxComponents:
    """The parts of a Diffusers Flux pipeline (hub id, e.g. "black-forest-labs/FLUX.1-dev", or directory); the
    transformer in float32, the frozen VAE / encoders in ``torch_dtype``; ``resolution`` in pixels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    common = {"revision": revision, "variant": variant}
    frozen = dict(common, torch_dtype=as_torch_dtype(torch_dtype))
    local = Path(pretrained).exists()
    return FluxComponents(
        transformer=FluxTransformer2DModel.from_pretrained(pretrained, subfolder="transformer", **common),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **frozen),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **frozen),
        text_encoder_2=T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_2", **frozen),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision),
        tokenizer_2=T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler",
                                                                  revision=revision),
        resolution=resolution, source=str(Path(pretrained).resolve()) if local else str(pretrained))


def build_sd3_pipeline(parts: SD3Components, transformer: nn.Module | None = None, scheduler: Any = None):
    """A ``StableDiffusion3Pipeline`` of the parts, with another transformer or scheduler if given."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else parts.transformer, vae=parts.vae,
        text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer_2, text_encoder_3=parts.text_encoder_3, tokenizer_3=parts.tokenizer_3,
        scheduler=scheduler if scheduler is not None else parts.scheduler)


@torch.no_grad()
def sd3_conditioning(pipeline: Any, captions: list[str],
                     max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH) -> dict[str, Tensor]:
    """Transformer keyword arguments of ``captions``: the pipeline's own ``encode_prompt`` (no CFG duplication)."""
    embeds, _, pooled, _ = pipeline.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length,
                                                  device=next(pipeline.text_encoder.parameters()).device)
    return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}


@torch.no_grad()
def flux_conditioning(pipeline: Any, captions: list[str], max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH,
                      guidance: float | None = None) -> dict[str, Tensor]:
    """Transformer keyword arguments of ``captions`` with a ``FluxPipeline``'s own ``encode_prompt``: T5 states
    [B, L, D] and the CLIP pooled embedding [B, P]; with ``guidance`` (guidance-distilled models, ``guidance_embeds``)
    also the embedded guidance [B], the value FluxPipeline's ``guidance_scale`` feeds the transformer."""
    device = next(pipeline.text_encoder.parameters()).device
    embeds, pooled, _ = pipeline.encode_prompt(prompt=list(captions), prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
    cond = {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}
    if guidance is not None:
        cond["guidance"] = torch.full((len(captions),), float(guidance), device=device)
    return cond


class FlowMatchingComponent:
    """What the SD3 and Flux ``LatentDiffusionComponent``s share (VAE, denoiser, LoRA and generator export); a
    subclass sets ``kind`` and implements ``pipeline`` and ``conditioning``.

    Args:
        parts: the pipeline parts (``parts.transformer`` is the base network).
        image_size: (H, W) in pixels.
        max_sequence_length: T5 tokens of the conditioning (the pipeline's ``max_sequence_length``).
    """

    kind: str
    input_scaling = "flow"      # a one-step generator's input (1 + sigma) z is the pipeline's x_t = z
    latent_packing = 1          # latent channels per transformer input channel (Flux packs 2 x 2 patches: 4)

    def __init__(self, parts: Any, image_size: tuple[int, int], max_sequence_length: int):
        self.parts = parts
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.scheduler, self.source = parts.scheduler, parts.source
        self.max_sequence_length = int(max_sequence_length)
        self._encoder = self.pipeline()

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.parts.vae, **self.parts.text_encoders()}

    def conditioning_tensors(self, cond: dict[str, Any]) -> dict[str, Tensor]:
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
                **({"guidance": cond["guidance"]} if "guidance" in cond else {})}

    def conditioning_from_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        cond = {"encoder_hidden_states": tensors["prompt_embeds"],
                "pooled_projections": tensors["pooled_prompt_embeds"]}
        return {**cond, "guidance": tensors["guidance"]} if "guidance" in tensors else cond

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        return encode_latents(self.parts.vae, images, sample)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.parts.vae, latents)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        factor = self.parts.vae_scale_factor
        channels = self.parts.transformer.config.in_channels // self.latent_packing
        return (batch, channels, self.image_size[0] // factor, self.image_size[1] // factor)

    def denoiser(self, net: nn.Module) -> nn.Module:
        return self._denoiser(net, null_cond=None)

    def sampling_denoiser(self, net: nn.Module, guidance: float = 1.0) -> nn.Module:
        from .denoisers import ClassifierFreeGuidance

        denoiser = self._denoiser(net, null_cond=self.conditioning([""]))
        return denoiser if guidance == 1.0 else ClassifierFreeGuidance(denoiser, guidance, denoiser.uncond)

    def schedule_shift(self) -> float | None:
        """Flux's mu for image_size (``use_dynamic_shifting``), else None."""
        if not self.scheduler.config.get("use_dynamic_shifting"):
            return None
        _, _, height, width = self.latent_shape(1)
        return flux_mu((height // 2) * (width // 2), self.scheduler.config)

    def _denoiser(self, net: nn.Module, null_cond: Any):
        from .denoisers import DiffusersDenoiser

        denoiser = DiffusersDenoiser(net, self.scheduler, null_cond=null_cond, mu=self.schedule_shift(),
                                     sample_size=self.latent_shape(1)[-1])
        denoiser.schedule.to(next(net.parameters()).device)
        return denoiser

    def pipeline(self, net: nn.Module | None = None, scheduler: Any = None):
        raise NotImplementedError

    def conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def save_pipeline(self, directory: str | Path, net: nn.Module | None = None, scheduler: Any = None) -> None:
        self.pipeline(net, scheduler).save_pretrained(str(directory))

    def save_lora(self, directory: str | Path, net: nn.Module) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
        # the adapter config travels as metadata: without it Diffusers loads with alpha = rank (wrong scale)
        metadata = net.peft_config["default"].to_dict()
        type(self.pipeline(net)).save_lora_weights(str(directory), transformer_lora_layers=layers,
                                                   safe_serialization=True, transformer_lora_adapter_metadata=metadata)

    def pipeline_call_options(self) -> str:
        """Keyword arguments, besides sigmas, with which the exported generator's pipeline is called."""
        return f"guidance_scale=1.0, max_sequence_length={self.max_sequence_length}"

    def generator_export(self, sigmas: tuple[float, ...]) -> tuple[Any, dict[str, Any]]:
        """(scheduler, fdistill.json fields) of a generator at noise levels ``sigmas``: the pipeline is called with
        their flow times t = sigma / (1 + sigma) as ``sigmas=`` (``flow_generator_scheduler``)."""
        times = [float(s) / (1 + float(s)) for s in sigmas]
        call = f"pipe(prompt, sigmas={times}, {self.pipeline_call_options()})"
        return flow_generator_scheduler(self.scheduler, len(times)), {"diffusers_sigmas": times,
                                                                       "diffusers_call": call}


class StableDiffusion3Component(FlowMatchingComponent):
    """The ``LatentDiffusionComponent`` of SD3, as ``StableDiffusionComponent`` is for SD1.5 / SDXL."""

    kind = "sd3"

    def __init__(self, parts: SD3Components, image_size: tuple[int, int],
                 max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH):
        super().__init__(parts, image_size, max_sequence_length)

    def conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        return sd3_conditioning(self._encoder, captions, self.max_sequence_length)

    def pipeline(self, net: nn.Module | None = None, scheduler: Any = None):
        return build_sd3_pipeline(self.parts, net, scheduler)


class FluxComponent(FlowMatchingComponent):
    """The ``LatentDiffusionComponent`` of Flux: T5 states and CLIP pooled embedding, packed latents, and for the
    guidance-distilled models (``guidance_embeds``) the embedded guidance ``guidance`` in every conditioning.

    Args:
        guidance: the embedded guidance of FLUX.1-dev-like models (FluxPipeline's ``guidance_scale``; 3.5 there).
    """

    kind = "flux"
    latent_packing = 4

    def __init__(self, parts: FluxComponents, image_size: tuple[int, int],
                 max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH, guidance: float = FLUX_GUIDANCE):
        self.guidance = float(guidance)
        super().__init__(parts, image_size, max_sequence_length)

    def conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        embedded = self.guidance if self.parts.transformer.config.guidance_embeds else None
        return flux_conditioning(self._encoder, captions, self.max_sequence_length, embedded)

    def pipeline(self, net: nn.Module | None = None, scheduler: Any = None):
        from diffusers import FluxPipeline

        parts = self.parts
        return FluxPipeline(transformer=net if net is not None else parts.transformer, vae=parts.vae,
                            text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                            text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                            scheduler=scheduler if scheduler is not None else parts.scheduler)

    def pipeline_call_options(self) -> str:
        return f"guidance_scale={self.guidance}, max_sequence_length={self.max_sequence_length}"
