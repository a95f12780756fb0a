"""Tiny Stable Diffusion 1.5 / SDXL models built from config (random init, offline CLIP tokenizer): no download,
for tests, CPU benchmarks and the ``tiny_sd`` model group."""
from __future__ import annotations

from typing import Any

import torch

from .pipelines import SDComponents, check_kind

TINY_WORDS = ("a", "an", "the", "of", "on", "red", "green", "blue", "yellow", "square", "circle", "cross",
              "shape", "background", "image", "photo", "dark", "light")


def _word_merges(word: str) -> list[tuple[str, str]]:
    """BPE merges that assemble ``word`` left to right into the single token ``word</w>``."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def tiny_clip_tokenizer(words: tuple[str, ...] = TINY_WORDS, model_max_length: int = 16):
    """A CLIP BPE tokenizer built offline: lower-case letters and digits, plus whole-word tokens for ``words``.

    Unknown characters are dropped by the CLIP pre-tokenizer; captions are padded / truncated to
    ``model_max_length`` tokens (bos + text + eos).
    """
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
                tokens.append(left + right)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _tiny_text_encoder(tokenizer, hidden_size: int, with_projection: bool, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_sd_components(kind: str = "sd15", image_size: int = 16, unet_channels: tuple[int, ...] = (16, 32),
                       vae_channels: tuple[int, ...] = (16,), text_hidden_size: int = 32,
                       seed: int = 0) -> SDComponents:
    """A randomly initialised Stable Diffusion built from config (no download), for tests and CPU benchmarks.

    The UNet has one cross-attention level per entry of ``unet_channels`` after the first; a one-level VAE
    (``vae_channels`` of length 1) keeps latents at image resolution (vae_scale_factor 1). SDXL adds a second
    (projected) text encoder and the "text_time" added conditioning with 6 time ids.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    check_kind(kind)
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    levels = len(unet_channels)
    groups = min(8, unet_channels[0])
    unet_kwargs: dict[str, Any] = dict(
        sample_size=image_size // 2 ** (len(vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=tuple(unet_channels), layers_per_block=1, norm_num_groups=groups,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=text_hidden_size, attention_head_dim=4,
    )
    parts: dict[str, Any] = dict(tokenizer=tokenizer,
                                 text_encoder=_tiny_text_encoder(tokenizer, text_hidden_size, False))
    if kind == "sdxl":
        parts["tokenizer_2"] = tiny_clip_tokenizer()
        parts["text_encoder_2"] = _tiny_text_encoder(tokenizer, text_hidden_size, True, projection_dim=32)
        unet_kwargs.update(cross_attention_dim=2 * text_hidden_size, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    parts["unet"] = UNet2DConditionModel(**unet_kwargs)
    parts["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), norm_num_groups=min(8, vae_channels[0]),
        layers_per_block=1, sample_size=image_size,
    )
    parts["scheduler"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                                       steps_offset=1, clip_sample=False)
    return SDComponents(**parts)
