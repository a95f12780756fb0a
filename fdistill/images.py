"""Image helpers shared by the sample command, training sample grids and evaluation: [-1, 1] tensors <-> uint8 PNGs.

Images are [B, C, H, W] float tensors in [-1, 1] with C = 1 (grey) or 3 (RGB).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# The preview grid ``fdistill sample`` writes beside its samples; readers of sample folders (FID) skip it.
GRID_FILENAME = "grid.png"
MIN_GRID_PIXELS = 256  # training grids are enlarged (nearest neighbour) until both sides are at least this long
CAPTION_PADDING = 2    # pixels around a caption's text


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


def labelled_grid(images: Tensor, labels: list[str] | None = None, nrow: int | None = None, padding: int = 1,
                  min_pixels: int = MIN_GRID_PIXELS) -> np.ndarray:
    """A grid to look at: ``make_grid`` enlarged by the smallest integer factor (nearest neighbour: tiny images
    stay sharp) that makes both sides >= ``min_pixels``, with a white caption strip under each image holding its
    label (class or prompt, PIL's default font, cut with "..." to the image's width). Returns [H', W', 3] uint8."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    scale = max(1, math.ceil(min_pixels / min(nrow * width, rows * height)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    strip = font.getbbox("Ag")[3] + 2 * CAPTION_PADDING if labels is not None else 0
    canvas = Image.new("RGB", (padding + nrow * (cell_w + padding), padding + rows * (cell_h + strip + padding)))
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(pixels):
        left = padding + (index % nrow) * (cell_w + padding)
        top = padding + (index // nrow) * (cell_h + strip + padding)
        canvas.paste(to_pil(image).convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (left, top))
        if labels is not None:
            draw.rectangle((left, top + cell_h, left + cell_w - 1, top + cell_h + strip - 1), fill="white")
            text = fit_text(str(labels[index]), font, cell_w - 2 * CAPTION_PADDING)
            draw.text((left + CAPTION_PADDING, top + cell_h + CAPTION_PADDING), text, fill="black", font=font)
    return np.asarray(canvas)


def fit_text(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, or its longest prefix followed by "..." that is at most ``width`` pixels long in ``font``."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def image_filename(index: int) -> str:
    """The file name of sample ``index`` in a sample folder: ``000000.png``, ``000001.png``, ..."""
    return f"{index:06d}.png"


def save_images(images: Tensor, directory: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write each image as ``directory/image_filename(start_index + i)``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, image in enumerate(to_uint8(images)):
        path = directory / image_filename(start_index + offset)
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
