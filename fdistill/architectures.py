"""The published architectures of the paper recipes as config dicts, built with random weights (no download).

Each dict holds the architecture fields of the ``config.json`` of the named hub repository at their published values
(fields that only name a library version are left out). With them, benchmarks and the real-size rehearsal
(``fdistill.rehearsal``) run the recipes' networks at their true size offline; ``sd_components_from_config`` and
``denoiser_from_config`` hand them to the methods exactly as ``fdistill.pipelines.load_sd_components`` and
``fdistill.denoisers.load_denoiser`` hand over the downloaded models (UNet in float32, frozen parts in
``torch_dtype``; a denoiser frozen and in eval mode).

The one part not reproduced is the CLIP tokenizer's 49,408-token vocabulary (a file, not a config): the offline
``tiny_clip_tokenizer`` with the published 77-token length stands in; token ids only choose embedding rows.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .pipelines import SDComponents, as_torch_dtype
from .tiny_sd import tiny_clip_tokenizer

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (859,520,964 parameters)
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1)

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (83,653,863 parameters); the SDXL VAE
# (stabilityai/stable-diffusion-xl-base-1.0 vae/, madebyollin/sdxl-vae-fp16-fix) is the same network with
# scaling_factor 0.13025
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
SDXL_VAE: dict[str, Any] = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# openai/clip-vit-large-patch14 text tower = SD1.5 text_encoder/config.json = SDXL text_encoder/ (123,060,480)
CLIP_L_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)

# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json: OpenCLIP ViT-bigG/14 text tower with
# projection (694,659,840 parameters)
OPENCLIP_BIGG_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5)

# scheduler/scheduler_config.json of both SD pipelines (the training noise schedule; SDXL ships it as Euler)
SD_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type="epsilon", steps_offset=1, clip_sample=False)

# google/ddpm-cifar10-32, unet/config.json and scheduler/scheduler_config.json (35,746,307 parameters)
DDPM_CIFAR10_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, time_embedding_type="positional")
DDPM_CIFAR10_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                              beta_end=0.02, clip_sample=True, variance_type="fixed_large")

# facebook/DiT-XL-2-256, transformer/config.json and scheduler/scheduler_config.json: class-conditional on 1000
# ImageNet classes, 32x32x4 SD-VAE latents, learned variance (8 output channels). 675 M parameters in the paper;
# Diffusers' DiTTransformer2DModel holds the shared timestep / class embedding once per block: 749,826,464
DIT_XL2_256: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    activation_fn="gelu-approximate", attention_bias=True, dropout=0.0, norm_num_groups=32, upcast_attention=False)
DIT_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                     beta_end=0.02, clip_sample=False, prediction_type="epsilon")

# The EDM / EDM2 teachers of the CIFAR-10 and ImageNet-64 recipes (fdistill.edm; convert the published pickles with
# scripts/convert_edm.py): name of the published checkpoint -> (network class, constructor arguments, preconditioning).
# EDM (Karras et al. 2022) App. F.2 / Table 7: DDPM++ on CIFAR-10 (55.7 M parameters; 9 augmentation labels),
# ADM on ImageNet-64 (295.9 M); EDM2 (Karras et al. 2024) Table 3: img64-S (280 M, 192 channels, dropout 0).
EDM_ARCHITECTURES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "edm-cifar10-32x32-cond-vp": ("SongUNet", dict(
        img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=128,
        channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.13,
        embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
        resample_filter=[1, 1]), dict(kind="edm", sigma_data=0.5)),
    "edm-imagenet-64x64-cond-adm": ("DhariwalUNet", dict(
        img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
        channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10),
        dict(kind="edm", sigma_data=0.5)),
    "edm2-img64-s": ("EDM2UNet", dict(
        img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
        num_blocks=3, attn_resolutions=[16, 8], dropout=0.0), dict(kind="edm", sigma_data=0.5)),
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2,028,328,000 parameters; MM-DiT, 24 joint
# blocks of 24 heads x 64); scheduler: FlowMatchEulerDiscreteScheduler, shift 3.0
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192)
SD3_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

# black-forest-labs/FLUX.1-dev, transformer/config.json (11,901,408,320 parameters; 19 joint + 38 single blocks,
# guidance embedding); scheduler: FlowMatchEulerDiscreteScheduler with the resolution-dependent shift
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# the 16-channel VAEs of SD3 and Flux (vae/config.json: no quant convs; their own shift and scaling factors)
SD3_VAE: dict[str, Any] = dict(SD15_VAE, latent_channels=16, sample_size=1024, use_quant_conv=False,
                               use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
FLUX_VAE: dict[str, Any] = dict(SD3_VAE, shift_factor=0.1159, scaling_factor=0.3611)

# google/t5-v1_1-xxl encoder = SD3 text_encoder_3/ = Flux text_encoder_2/ (4,762,310,656 parameters)
T5_XXL_ENCODER: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    is_gated_act=True, dense_act_fn="gelu_new", layer_norm_epsilon=1e-6)

SD_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": CLIP_L_TEXT},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": OPENCLIP_BIGG_TEXT},
}


def _clip_text_encoder(config: dict[str, Any], tokenizer, with_projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def sd_components_from_config(kind: str = "sd15", torch_dtype: torch.dtype | str | None = None,
                              latent_size: int | None = None, seed: int = 0) -> SDComponents:
    """Stable Diffusion 1.5 / SDXL base with random weights, from the published configs (``SD_ARCHITECTURES``).

    Args:
        kind: "sd15" or "sdxl".
        torch_dtype: dtype of the frozen VAE / text encoders (the UNet stays float32), as ``load_sd_components``.
        latent_size: the UNet's ``sample_size`` (its default generation size in latent pixels; no weight depends
            on it); None = the published 64 (SD1.5) / 128 (SDXL). Training at other resolutions sets it to
            resolution / 8 so the methods' resolution checks see the resolution the run uses.
        seed: seed of the random weights.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if kind not in SD_ARCHITECTURES:
        raise ValueError(f"kind must be one of {sorted(SD_ARCHITECTURES)}, got {kind!r}")
    architecture, dtype = SD_ARCHITECTURES[kind], as_torch_dtype(torch_dtype)
    torch.manual_seed(seed)
    unet_config = dict(architecture["unet"], **({} if latent_size is None else {"sample_size": latent_size}))
    tokenizer = tiny_clip_tokenizer(model_max_length=CLIP_L_TEXT["max_position_embeddings"])
    parts: dict[str, Any] = dict(
        unet=UNet2DConditionModel(**unet_config),
        vae=AutoencoderKL(**architecture["vae"]).to(dtype),
        text_encoder=_clip_text_encoder(architecture["text_encoder"], tokenizer, with_projection=False).to(dtype),
        tokenizer=tokenizer, scheduler=DDPMScheduler(**SD_SCHEDULER))
    if kind == "sdxl":
        parts["tokenizer_2"] = tokenizer
        parts["text_encoder_2"] = _clip_text_encoder(architecture["text_encoder_2"], tokenizer,
                                                     with_projection=True).to(dtype)
    return SDComponents(**parts)


def _ddpm_cifar10_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**DDPM_CIFAR10_UNET)


def _dit_xl2_256() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_XL2_256)


def _imagenet64_unet() -> nn.Module:
    from .networks import imagenet64_unet

    return imagenet64_unet()


def _edm_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from .edm import edm_model_from_config

        class_name, network, precond = EDM_ARCHITECTURES[name]
        return edm_model_from_config(class_name, network, precond)
    return build


# name -> (builder of the network with random weights, its scheduler config; None: the builder returns a denoiser)
DENOISER_ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any] | None]] = {
    "ddpm-cifar10-32": (_ddpm_cifar10_unet, DDPM_CIFAR10_SCHEDULER),  # google/ddpm-cifar10-32 (CIFAR-10 recipes)
    "imagenet64-unet": (_imagenet64_unet, None),   # fdistill.networks.imagenet64_unet (ADM-sized, class-conditional)
    "dit-xl-2-256": (_dit_xl2_256, DIT_SCHEDULER),  # facebook/DiT-XL-2-256 (class-conditional, latent space)
    **{name: (_edm_builder(name), None) for name in EDM_ARCHITECTURES},   # the papers' EDM / EDM2 teachers
}


def network_from_config(architecture: str) -> nn.Module:
    """The network of a published architecture (``DENOISER_ARCHITECTURES``) with random weights, unwrapped (buildable
    on the meta device, e.g. to count parameters)."""
    if architecture not in DENOISER_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(DENOISER_ARCHITECTURES)}, got {architecture!r}")
    return DENOISER_ARCHITECTURES[architecture][0]()


def denoiser_from_config(architecture: str, seed: int = 0) -> nn.Module:
    """The denoiser of a published architecture with random weights, frozen and in eval mode as
    ``fdistill.denoisers.load_denoiser`` returns a downloaded one."""
    from .denoisers import DiffusersDenoiser

    torch.manual_seed(seed)
    network, scheduler = network_from_config(architecture), DENOISER_ARCHITECTURES[architecture][1]
    denoiser = network if scheduler is None else DiffusersDenoiser(network, scheduler)
    return denoiser.eval().requires_grad_(False)


def flow_components_from_config(kind: str = "sd3", torch_dtype: torch.dtype | str | None = None,
                                latent_size: int | None = None, seed: int = 0):
    """SD3 medium ("sd3") or FLUX.1-dev ("flux") with random weights from the published configs, as
    ``fdistill.flow_pipelines.load_sd3_components`` / ``load_flux_components`` hand them over (transformer in
    float32, frozen parts in ``torch_dtype``). ``latent_size``: the generation size in latent pixels (None = 128,
    1024 px). The CLIP / T5 tokenizers are the offline tiny ones (token ids only choose embedding rows)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .flow_pipelines import FluxComponents, SD3Components

    if kind not in ("sd3", "flux"):
        raise ValueError(f"kind must be one of ['flux', 'sd3'], got {kind!r}")
    dtype, side = as_torch_dtype(torch_dtype), latent_size or 128
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(model_max_length=CLIP_L_TEXT["max_position_embeddings"])
    t5 = T5EncoderModel(T5Config(**T5_XXL_ENCODER, pad_token_id=tokenizer.pad_token_id)).to(dtype)
    if kind == "sd3":
        return SD3Components(
            transformer=SD3Transformer2DModel(**dict(SD3_MEDIUM_TRANSFORMER, sample_size=side)),
            vae=AutoencoderKL(**SD3_VAE).to(dtype), tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=tokenizer,
            text_encoder=_clip_text_encoder(CLIP_L_TEXT, tokenizer, with_projection=True).to(dtype),
            text_encoder_2=_clip_text_encoder(OPENCLIP_BIGG_TEXT, tokenizer, with_projection=True).to(dtype),
            text_encoder_3=t5, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    return FluxComponents(
        transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), vae=AutoencoderKL(**FLUX_VAE).to(dtype),
        text_encoder=_clip_text_encoder(CLIP_L_TEXT, tokenizer, with_projection=False).to(dtype), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        resolution=side * 8)
