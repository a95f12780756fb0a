"""Stable Diffusion 1.5 / SDXL components: load them from a hub id or a local directory, encode prompts into the
UNet's conditioning, rebuild a Diffusers pipeline; ``StableDiffusionComponent`` offers these jobs to a method as one
object (``fdistill.latent_component``). Tiny models built from config: ``fdistill.tiny_sd``.

The components follow the Diffusers pipeline layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and, for SDXL, ``text_encoder_2/`` + ``tokenizer_2/``), so a directory written by
``save_components`` loads with ``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusionXLPipeline``.

Conditioning (what the UNet is called with), as in the Diffusers pipelines:
- SD1.5: ``encoder_hidden_states`` = last hidden state of the CLIP text encoder, [B, L, 768].
- SDXL: ``encoder_hidden_states`` = concatenated penultimate hidden states of both encoders, [B, L, 768 + 1280];
  ``added_cond_kwargs = {"text_embeds": pooled projection of encoder 2 [B, 1280], "time_ids": [B, 6]}`` with the
  micro-conditioning time ids (original_h, original_w, crop_top, crop_left, target_h, target_w) (Podell et al.
  2023, Sec. 2.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .export_schedulers import few_step_scheduler, integer_timesteps, one_step_scheduler

SD_KINDS = ("sd15", "sdxl")
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model. ``text_encoder_2`` / ``tokenizer_2`` are set only for SDXL.
    ``source`` is the hub id or directory they were loaded from (None when built in memory): a LoRA trained on
    them records it as its base model."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    source: str | None = None

    @property
    def kind(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd15"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along one side (8 for SD; 1 for the tiny test VAE)."""
        return vae_scale_factor(self.vae)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels of the images the UNet's latents decode to."""
        side = int(self.unet.config.sample_size) * self.vae_scale_factor
        return side, side

    def text_encoders(self) -> dict[str, nn.Module]:
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders


def check_kind(kind: str) -> None:
    if kind not in SD_KINDS:
        raise ValueError(f"Stable Diffusion kind {kind!r} not in {SD_KINDS}")


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel along one side: one factor 2 per downsampling level of a Diffusers AutoencoderKL."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or its name ('float32', 'float16', 'bfloat16'; None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"model.torch_dtype must be one of {sorted(TORCH_DTYPES)} or null, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def load_sd_components(pretrained: str, kind: str = "sd15", revision: str | None = None,
                       variant: str | None = None, torch_dtype: torch.dtype | str | None = None,
                       vae: str | None = None) -> SDComponents:
    """Load the components of a Diffusers Stable Diffusion pipeline (hub id or local directory).

    Args:
        pretrained: e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "stabilityai/stable-diffusion-xl-base-1.0", or a local pipeline directory (model_index.json).
        kind: "sd15" or "sdxl" (SDXL also loads text_encoder_2 / tokenizer_2).
        revision, variant: passed to ``from_pretrained`` (variant "fp16" picks the half-precision files).
        torch_dtype: dtype (or its name) of the frozen VAE / text encoders; the UNet is always loaded in float32
            (trained weights stay fp32, the trainer's autocast runs the low-precision compute).
        vae: another VAE (hub id or directory of an AutoencoderKL), e.g. "madebyollin/sdxl-vae-fp16-fix" (the
            SDXL VAE overflows in fp16).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_kind(kind)
    common = {"revision": revision, "variant": variant}
    frozen = dict(common, torch_dtype=as_torch_dtype(torch_dtype))
    parts = dict(
        unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **common),
        vae=AutoencoderKL.from_pretrained(vae, torch_dtype=frozen["torch_dtype"]) if vae else
        AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **frozen),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **frozen),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision),
        scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision),
    )
    if kind == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", **frozen)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
    local = Path(pretrained).exists()       # a directory is recorded absolute: a LoRA export loads from anywhere
    return SDComponents(**parts, source=str(Path(pretrained).resolve()) if local else str(pretrained))


# ------------------------------------------------------------------------------------------ conditioning

def _tokenize(tokenizer, captions: list[str], device: torch.device) -> Tensor:
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def encode_prompts(components: SDComponents, captions: list[str]) -> tuple[Tensor, Tensor | None]:
    """Text conditioning of ``captions`` as the Diffusers pipelines compute it (no classifier-free duplication).

    Returns:
        prompt_embeds: [B, L, D] (SD1.5: last hidden state; SDXL: both encoders' penultimate states, concatenated).
        pooled: [B, P] projected pooled embedding of SDXL's second encoder, or None for SD1.5.
    """
    device = next(components.text_encoder.parameters()).device
    if components.kind == "sd15":
        return components.text_encoder(_tokenize(components.tokenizer, captions, device))[0], None
    states, pooled = [], None
    for encoder, tokenizer in ((components.text_encoder, components.tokenizer),
                               (components.text_encoder_2, components.tokenizer_2)):
        out = encoder(_tokenize(tokenizer, captions, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
                  batch_size: int) -> Tensor:
    """SDXL micro-conditioning [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    row = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
    return row.expand(batch_size, 6).clone()


def sdxl_time_ids_of_batch(item: dict[str, Any], image_size: tuple[int, int]) -> Tensor:
    """[B, 6] SDXL micro-conditioning from a batch's "original_size" and "crop_top_left" ([B, 2] each) and the
    training resolution (target size); batches without them use original = target, crop = (0, 0)."""
    batch = len(item["caption"])
    target = torch.tensor(image_size, dtype=torch.float32).expand(batch, 2)
    original = item.get("original_size")
    original = target if original is None else original.float().cpu()
    crop = item.get("crop_top_left")
    crop = torch.zeros(batch, 2) if crop is None else crop.float().cpu()
    return torch.cat([original, crop, target], dim=1)


@torch.no_grad()
def text_conditioning(components: SDComponents, captions: list[str], image_size: tuple[int, int],
                      time_ids: Tensor | None = None) -> dict[str, Any]:
    """UNet keyword arguments for ``captions`` (``encode_prompts`` + ``unet_conditioning``). SDXL: ``time_ids``
    [B, 6], by default original size = target size = ``image_size`` (H, W) in pixels and no crop."""
    prompt_embeds, pooled = encode_prompts(components, list(captions))
    if pooled is None:
        return unet_conditioning(prompt_embeds)
    if time_ids is None:
        time_ids = sdxl_time_ids(image_size, (0, 0), image_size, len(captions))
    return unet_conditioning(prompt_embeds, pooled, time_ids.to(pooled.device))


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor, sample: bool = False) -> Tensor:
    """[B, 3, H, W] images in [-1, 1] -> scaled latents [B, C, H/f, W/f] (float32): the posterior mean, or a draw
    from it (``sample``), as (z - shift_factor) * scaling_factor (the Diffusers convention)."""
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.sample() if sample else posterior.mode()
    shift = vae.config.get("shift_factor") or 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, h f, w f] in [-1, 1] (float32); inverse of ``encode_latents``."""
    shift = vae.config.get("shift_factor") or 0.0
    return vae.decode((latents.float() / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float().clamp(-1, 1)


def unet_conditioning(prompt_embeds: Tensor, pooled: Tensor | None = None,
                      time_ids: Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments of ``UNet2DConditionModel.forward`` besides the sample and timestep."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": prompt_embeds}
    if pooled is not None:
        if time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids [B, 6] together with the pooled text embeddings")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(pooled)}
    return kwargs


# ------------------------------------------------------------------------------------------ pipelines

def build_pipeline(components: SDComponents, unet: nn.Module | None = None, scheduler: Any = None):
    """A Diffusers text-to-image pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) from the
    components, optionally with another UNet (e.g. the tuned one) or scheduler. No safety checker."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[components.kind])
    parts = dict(unet=unet if unet is not None else components.unet, vae=components.vae,
                 text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                 scheduler=scheduler if scheduler is not None else components.scheduler)
    if components.kind == "sdxl":
        parts.update(text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls(**parts)


def save_components(components: SDComponents, directory: str) -> None:
    """Write the components as a Diffusers pipeline directory (loadable with ``from_pretrained(directory)``)."""
    build_pipeline(components).save_pretrained(directory)



# ------------------------------------------------------------------------------------------ the component

class StableDiffusionComponent:
    """The ``fdistill.latent_component.LatentDiffusionComponent`` of Stable Diffusion 1.5 / SDXL: the pipeline parts
    (``SDComponents``) and the image size; each method is this module's function of the same job.

    Args:
        parts: the pipeline parts; ``parts.unet`` is the base UNet (its config gives the latent channels).
        image_size: (H, W) in pixels.
    """

    def __init__(self, parts: SDComponents, image_size: tuple[int, int]):
        self.parts = parts
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.kind, self.scheduler, self.source = parts.kind, parts.scheduler, parts.source

    input_scaling = "vp"        # a one-step generator's input sqrt(1 + sigma^2) z is the pipelines' x_T = z

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.parts.vae, **self.parts.text_encoders()}

    def conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """UNet keyword arguments; SDXL time ids: ``[res, res, 0, 0, res, res]`` without ``batch`` (the released
        Diffusion-DPO code), the batch's "original_size" / "crop_top_left" with it (``sdxl_time_ids_of_batch``)."""
        from_data = self.kind == "sdxl" and batch is not None
        time_ids = sdxl_time_ids_of_batch(batch, self.image_size) if from_data else None
        return text_conditioning(self.parts, captions, self.image_size, time_ids)

    def conditioning_tensors(self, cond: dict[str, Any]) -> dict[str, Tensor]:
        tensors = {"prompt_embeds": cond["encoder_hidden_states"]}
        if "added_cond_kwargs" in cond:
            tensors.update(pooled_prompt_embeds=cond["added_cond_kwargs"]["text_embeds"],
                           time_ids=cond["added_cond_kwargs"]["time_ids"])
        return tensors

    def conditioning_from_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        return unet_conditioning(tensors["prompt_embeds"], tensors.get("pooled_prompt_embeds"), tensors.get("time_ids"))

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        return encode_latents(self.parts.vae, images, sample)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.parts.vae, latents)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        factor = self.parts.vae_scale_factor
        return (batch, self.parts.unet.config.in_channels, self.image_size[0] // factor, self.image_size[1] // factor)

    def denoiser(self, net: nn.Module) -> nn.Module:
        return self._denoiser(net, null_cond=None)

    def schedule_shift(self) -> None:
        return None

    def sampling_denoiser(self, net: nn.Module, guidance: float = 1.0) -> nn.Module:
        from .denoisers import ClassifierFreeGuidance

        denoiser = self._denoiser(net, null_cond=self.conditioning([""]))
        return denoiser if guidance == 1.0 else ClassifierFreeGuidance(denoiser, guidance, denoiser.uncond)

    def _denoiser(self, net: nn.Module, null_cond: Any):
        from .denoisers import DiffusersDenoiser

        denoiser = DiffusersDenoiser(net, self.scheduler, null_cond=null_cond)
        denoiser.schedule.to(next(net.parameters()).device)       # the sigma -> timestep table runs beside the net
        return denoiser

    def pipeline(self, net: nn.Module | None = None, scheduler: Any = None):
        return build_pipeline(self.parts, net, scheduler)

    def save_pipeline(self, directory: str | Path, net: nn.Module | None = None, scheduler: Any = None) -> None:
        self.pipeline(net, scheduler).save_pretrained(str(directory))

    def generator_export(self, sigmas: tuple[float, ...]) -> tuple[Any, dict[str, Any]]:
        """(scheduler, fdistill.json fields) of a generator at noise levels ``sigmas``: one step, a DDIM scheduler
        (``one_step_scheduler``); few steps, an LCM scheduler called with their integer timesteps
        (``few_step_scheduler``). ValueError for sigmas off the timestep grid (``integer_timesteps``)."""
        from .denoisers.diffusers import VPSchedule, alphas_cumprod_from_scheduler

        timesteps = integer_timesteps(VPSchedule(alphas_cumprod_from_scheduler(self.scheduler)), sigmas)
        one_step = len(sigmas) == 1
        scheduler = (one_step_scheduler if one_step else few_step_scheduler)(self.scheduler)
        call = ("pipe(prompt, num_inference_steps=1, guidance_scale=1.0)" if one_step else
                f"pipe(prompt, timesteps={timesteps}, guidance_scale=1.0)")
        return scheduler, {"diffusers_timesteps": timesteps, "diffusers_call": call}

    def save_lora(self, directory: str | Path, net: nn.Module) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
        # the adapter config travels as metadata: without it Diffusers loads with alpha = rank (wrong scale)
        metadata = net.peft_config["default"].to_dict()
        type(self.pipeline(net)).save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                                   unet_lora_adapter_metadata=metadata)
