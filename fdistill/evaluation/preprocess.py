"""Image preprocessing for FID feature extractors, identical to clean-fid's (Parmar et al. 2022).

Images enter as uint8 [B, 3, H, W] (what a PNG holds; in-memory images in [-1, 1] are quantised first with
``quantize_to_uint8``, as saving them would). Modes:

- ``clean``: each channel is resized to 299x299 with PIL's bicubic filter on float32 data (``Image.fromarray(x,
  mode='F')``), clipped to [0, 255], no re-quantisation. ``clean_resize_pil`` is that reference, one image at a time;
  ``clean_resize`` computes the same thing batched: PIL's resampling is separable and linear (a horizontal pass into
  a float32 buffer, then a vertical pass), so it equals ``R_h X R_w^T`` with the two matrices read off PIL itself by
  resizing identity images. Same values to < 1e-3 on the 0-255 scale (float32 round-off), no per-image Python loop.
- ``legacy_tensorflow``: no resize outside the network (the TorchScript Inception resizes internally).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torch import Tensor

INCEPTION_SIZE = 299
MODES = ("clean", "legacy_tensorflow")


def quantize_to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 with x -> clip(x * 127.5 + 128) (rounds to nearest, as a PNG export would)."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def as_rgb_uint8(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W], C in {1, 3, 4} -> [B, 3, H, W] (gray repeated, alpha dropped, as convert('RGB'))."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    channels = images.shape[1]
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels in (3, 4):
        return images[:, :3]
    raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")


def clean_resize_pil(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's clean-mode resize of one image [H, W, 3] (uint8 or float) -> [size, size, 3] float32 in [0, 255]."""
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((size, size), resample=Image.BICUBIC)) for c in range(image.shape[2])]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


@functools.lru_cache(maxsize=16)
def pil_bicubic_matrix(in_size: int, out_size: int) -> Tensor:
    """[out_size, in_size] float64 matrix R with PIL's float bicubic 1-D resize of a vector v equal to R v.

    Read off PIL: resizing the in_size x in_size identity image along one axis returns R (or R^T) column by column.
    """
    identity = Image.fromarray(np.eye(in_size, dtype=np.float32), mode="F")
    rows = np.asarray(identity.resize((in_size, out_size), resample=Image.BICUBIC))    # vertical pass only
    return torch.from_numpy(rows.astype(np.float64))


def clean_resize(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Batched clean-mode resize: uint8 or float [B, C, H, W] in [0, 255] -> float32 [B, C, size, size] in [0, 255].

    Horizontal pass, then vertical pass, as PIL. Arithmetic is float32 (PIL accumulates each pass in double and
    stores float32): results differ from ``clean_resize_pil`` by < 1e-3 on the 0-255 scale, at a fraction of the cost.
    """
    height, width = images.shape[-2:]
    resize_width = pil_bicubic_matrix(width, size).float()             # [size, W]
    resize_height = pil_bicubic_matrix(height, size).float()           # [size, H]
    return (resize_height @ (images.float() @ resize_width.T)).clamp_(0, 255)


def inception_input(images: Tensor, mode: str = "clean") -> Tensor:
    """uint8 [B, C, H, W] -> float32 [B, 3, *, *] in [0, 255] as clean-fid feeds its feature extractor in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = as_rgb_uint8(images)
    return clean_resize(images) if mode == "clean" else images.float()
