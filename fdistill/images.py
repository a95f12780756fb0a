"""Image helpers shared by the sample command, training sample grids and evaluation: [-1, 1] tensors <-> uint8 PNGs.

Images are [B, C, H, W] float tensors in [-1, 1] with C = 1 (grey) or 3 (RGB).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# The preview grid ``fdistill sample`` writes beside its samples; readers of sample folders (FID) skip it.
GRID_FILENAME = "grid.png"


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8 in [0, 255] (clipped; rounded to nearest, as EDM saves)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C in (1, 3), got shape {tuple(images.shape)}")
    scaled = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """One [H, W, C] uint8 array -> a PIL image (mode "L" for one channel, "RGB" for three)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile [B, C, H, W] images in [-1, 1] into one [rows * (H + p) + p, nrow * (W + p) + p, C] uint8 array
    (``nrow`` images per row, default ceil(sqrt(B)); black padding)."""
    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    grid = np.zeros((rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), np.uint8)
    for index, image in enumerate(pixels):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def save_images(images: Tensor, directory: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write each image as ``directory/{start_index + i:06d}.png``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, image in enumerate(to_uint8(images)):
        path = directory / f"{start_index + offset:06d}.png"
        to_pil(image).save(path)
        paths.append(path)
    return paths


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> Path:
    """Write ``make_grid(images, nrow)`` as a PNG, each pixel repeated ``upscale`` times (small images are
    easier to look at); returns the path."""
    grid = make_grid(images, nrow)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(path)
    return path


def load_images(directory: str | os.PathLike, pattern: str = "[0-9]*.png") -> Tensor:
    """Read PNGs matching ``pattern`` (sorted by name) back into [B, C, H, W] float32 in [-1, 1]."""
    paths = sorted(Path(directory).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no images matching {pattern!r} in {directory}")
    arrays = [np.asarray(Image.open(p)) for p in paths]
    stacked = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return (torch.from_numpy(stacked).permute(0, 3, 1, 2).float() - 127.5) / 127.5
