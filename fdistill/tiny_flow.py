"""Tiny SD3 and Flux pipelines built from config (random init, the offline CLIP tokenizer of ``fdistill.tiny_sd``): no
download, for tests, CPU runs and the ``tiny_sd3`` / ``tiny_flux`` model groups."""
from __future__ import annotations

import torch

from .flow_pipelines import FluxComponents, SD3Components, frozen_parts_in
from .tiny_sd import _tiny_text_encoder, tiny_clip_tokenizer


def tiny_sd3_components(image_size: int = 16, seed: int = 0, shift: float = 3.0,
                        torch_dtype: torch.dtype | str | None = None) -> SD3Components:
    """A randomly initialised SD3 built from config (no download): a 2-layer ``SD3Transformer2DModel`` (patch 2), a
    one-level VAE (latents at image resolution, SD3's shift / scaling factors), two tiny projected CLIP encoders and
    a tiny T5 encoder sharing the offline CLIP tokenizer of ``fdistill.tiny_sd``; frozen parts in ``torch_dtype``
    (as ``load_sd3_components``, so the recipes run on it)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizers = [tiny_clip_tokenizer() for _ in range(3)]
    clip_width, t5_width = 32, 64          # T5 width >= both CLIP widths: the CLIP states are zero-padded to it
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizers[2]), d_model=t5_width, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 pad_token_id=tokenizers[2].pad_token_id))
    parts = SD3Components(
        transformer=SD3Transformer2DModel(sample_size=image_size, patch_size=2, in_channels=4, out_channels=4,
                                          num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                          joint_attention_dim=t5_width, caption_projection_dim=32,
                                          pooled_projection_dim=2 * 32, pos_embed_max_size=image_size),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
                          down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                          norm_num_groups=8, layers_per_block=1, sample_size=image_size, shift_factor=0.1,
                          scaling_factor=1.5),
        text_encoder=_tiny_text_encoder(tokenizers[0], clip_width, True, projection_dim=32),
        text_encoder_2=_tiny_text_encoder(tokenizers[1], clip_width, True, projection_dim=32),
        text_encoder_3=t5, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2],
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))
    return frozen_parts_in(parts, torch_dtype)


def tiny_flux_components(image_size: int = 16, seed: int = 0, guidance_embeds: bool = True,
                         torch_dtype: torch.dtype | str | None = None) -> FluxComponents:
    """A randomly initialised Flux built from config (no download): a ``FluxTransformer2DModel`` with one joint and
    one single block (16 packed channels = 4 latent channels x 2 x 2), a one-level VAE, a tiny CLIP and a tiny T5
    sharing the offline tokenizer of ``fdistill.tiny_sd``, and the dynamically shifted scheduler of FLUX.1; frozen
    parts in ``torch_dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizers = [tiny_clip_tokenizer() for _ in range(2)]
    parts = FluxComponents(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                           axes_dims_rope=(4, 2, 2)),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
                          down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                          norm_num_groups=8, layers_per_block=1, sample_size=image_size, shift_factor=0.1,
                          scaling_factor=1.5),
        text_encoder=_tiny_text_encoder(tokenizers[0], 32, False),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tokenizers[1]), d_model=32, d_kv=8, d_ff=64,
                                               num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                               pad_token_id=tokenizers[1].pad_token_id)),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], resolution=image_size,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True,
                                                  base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096))
    return frozen_parts_in(parts, torch_dtype)
