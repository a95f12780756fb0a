"""The models ``fdistill sample`` draws from: built-in analytic teachers, model directories and hub ids (with the
VAE and text encoders of a latent text-to-image pipeline), and classifier-free guidance on top."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fdistill.commands import UsageError
from fdistill.denoisers import ClassifierFreeGuidance
from fdistill.flow_pipelines import FLUX_GUIDANCE, flux_conditioning, sd3_conditioning
from fdistill.pipelines import decode_latents

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    """A loaded model with what sampling needs besides the denoiser.

    Attributes:
        denoiser: D(x, sigma, cond) -> x0.
        info: fdistill.denoisers.io.ModelInfo.
        uncond: null condition for a condition (classifier-free guidance), None for unconditional models.
        encode_prompts: captions -> the denoiser's cond (text models), else None.
        decode: model samples -> images in [-1, 1] (a VAE for latent models, identity otherwise).
    """

    denoiser: nn.Module
    info: Any
    uncond: Callable[[Any], Any] | None = None
    encode_prompts: Callable[[list[str]], Any] | None = None
    decode: Callable[[Tensor], Tensor] = lambda x: x


# ------------------------------------------------------------------------------------------------ models


def digits_exact(dtype: torch.dtype, device: str) -> Model:
    """The ideal denoiser of sklearn's 1,797 digits (8x8, labels): exact, offline, no file needed."""
    from fdistill.data.builtin import digits_images
    from fdistill.denoisers import EmpiricalDenoiser
    from fdistill.denoisers.io import ModelInfo

    images, labels = digits_images(8)
    info = ModelInfo(sample_shape=(1, 8, 8), num_classes=10, conditioning="class", wrapper="analytic",
                     source="digits-exact")       # the default EDM noise range
    return Model(EmpiricalDenoiser(images, labels).to(device), info, uncond=lambda cond: None)


BUILTIN_MODELS: dict[str, Callable[[torch.dtype, str], Model]] = {"digits-exact": digits_exact}


def _prompt_encoder(denoiser: nn.Module, components: dict[str, tuple[str, str]], image_size: int, device: str):
    """captions -> UNet conditioning with the pipeline's CLIP text encoder(s) (fdistill.pipelines). The empty
    prompt's encoding becomes the denoiser's null condition (classifier-free guidance)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fdistill.pipelines import SDComponents, encode_prompts, sdxl_time_ids, unet_conditioning

    def part(cls, name):
        loaded = cls.from_pretrained(components[name][0], subfolder=components[name][1])
        return loaded.to(device).eval() if isinstance(loaded, nn.Module) else loaded
    sdxl = "text_encoder_2" in components
    parts = SDComponents(unet=None, vae=None, scheduler=None, tokenizer=part(CLIPTokenizer, "tokenizer"),
                         text_encoder=part(CLIPTextModel, "text_encoder"),
                         tokenizer_2=part(CLIPTokenizer, "tokenizer_2") if sdxl else None,
                         text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2") if sdxl else None)

    @torch.no_grad()
    def encode(captions: list[str]) -> Any:
        embeds, pooled = encode_prompts(parts, captions)
        size = (image_size, image_size)
        return unet_conditioning(embeds, pooled, sdxl_time_ids(size, (0, 0), size, len(captions)) if sdxl else None)

    denoiser.null_cond = encode([""])
    return encode


def load_model(name: str, dtype: torch.dtype, device: str, embedded_guidance: float = FLUX_GUIDANCE) -> Model:
    """A built-in model by name, or a model directory / hub id (fdistill.denoisers.load_denoiser) with its VAE and
    text encoders when it is a latent text-to-image pipeline. ``embedded_guidance``: the guidance input of a
    guidance-distilled Flux transformer (FluxPipeline's ``guidance_scale``); other models ignore it."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](dtype, device)
    from fdistill.denoisers import load_denoiser

    try:
        denoiser, info = load_denoiser(name, dtype=None if dtype == torch.float32 else dtype, device=device)
    except FileNotFoundError as error:
        raise UsageError(f"--model: {error}; give a model directory, a hub id or a built-in model: "
                         f"{', '.join(BUILTIN_MODELS)}") from error
    model = Model(denoiser, info, uncond=getattr(denoiser, "uncond", None))
    image_size = info.sample_shape[-1]
    if "vae" in info.components:
        from diffusers import AutoencoderKL

        root, subfolder = info.components["vae"]
        vae = AutoencoderKL.from_pretrained(root, subfolder=subfolder).to(device).eval()
        image_size *= 2 ** (len(vae.config.block_out_channels) - 1)
        model.decode = functools.partial(decode_latents, vae)
    if info.conditioning == "text":
        if "text_encoder" not in info.components:
            raise UsageError(f"--model {name}: a text-conditioned model needs its pipeline's text_encoder/tokenizer")
        if getattr(denoiser, "flow", False):        # SD3: CLIP + CLIP + T5; Flux: T5 + CLIP pooled (flow_pipelines)
            guidance = embedded_guidance if getattr(denoiser.net.config, "guidance_embeds", False) else None
            model.encode_prompts = flow_prompt_encoder(denoiser, info.components, device, guidance)
        else:
            model.encode_prompts = _prompt_encoder(denoiser, info.components, image_size, device)
    return model


def guided(model: Model, scale: float) -> nn.Module:
    """The denoiser with classifier-free guidance of weight ``scale`` (1 = none)."""
    if scale == 1.0:
        return model.denoiser
    if model.info.conditioning == "none":
        raise UsageError("--guidance needs a conditional model (class labels or text); this model is unconditional")
    return ClassifierFreeGuidance(model.denoiser, scale, uncond=model.uncond)


def flow_prompt_encoder(denoiser: nn.Module, components: dict[str, tuple[str, str]], device: str,
                        embedded_guidance: float | None = None):
    """captions -> transformer conditioning with the text encoders of a saved SD3 pipeline (CLIP-L + CLIP-G + T5) or
    Flux pipeline (T5 states, CLIP pooled embedding, and the ``embedded_guidance`` of guidance-distilled models),
    encoded by the pipeline's own ``encode_prompt`` (``components``: name -> (root, subfolder),
    ``fdistill.denoisers.ModelInfo.components``). The empty prompt's encoding becomes the denoiser's null condition
    (classifier-free guidance; Flux: FluxPipeline's ``true_cfg_scale`` with ``negative_prompt=""``)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    flux = denoiser.model_class == "FluxTransformer2DModel"
    root = components["text_encoder"][0]
    pipeline = (FluxPipeline if flux else StableDiffusion3Pipeline).from_pretrained(
        root, transformer=denoiser.net, vae=None).to(device)
    encode = functools.partial(flux_conditioning, pipeline, guidance=embedded_guidance) if flux else \
        functools.partial(sd3_conditioning, pipeline)
    denoiser.null_cond = encode([""])
    return encode
