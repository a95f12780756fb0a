"""Text-to-image data: captioned images and prompt lists (f-distill of Stable Diffusion).

Items are dicts ``{"caption": str}`` plus, for captioned images, ``"x"``: [3, R, R] float32 in [-1, 1]. The
default collate turns captions into a list[str] per batch. Sources:
- ``captioned_shapes``: built in (no download), "a <colour> <shape>" pictures with their captions.
- ``prompt_file``: prompts only, one per line of a text file (no real images: distribution matching without a
  discriminator, i.e. ``method.divergence=rkl method.gan_weight=0``, DMD).
- ``fdistill.data.hf_images(..., caption_column=...)``: a Hugging Face dataset (COCO, LAION parquet files, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from .base import DataSource
from .preference import COLOURS, SHAPES, generate_shape_pairs


class CaptionedImages(Dataset):
    """In-memory images [N, C, R, R] in [-1, 1] (or None: prompts only) with one caption each."""

    def __init__(self, captions: list[str], images: Tensor | None = None):
        if images is not None and len(images) != len(captions):
            raise ValueError(f"CaptionedImages: {len(images)} images but {len(captions)} captions")
        self.captions, self.images = list(captions), images

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"caption": self.captions[index]}
        if self.images is not None:
            item["x"] = self.images[index]
        return item


def shape_prompts() -> list[str]:
    """Every caption of the built-in shapes, sorted: "a <colour> <shape>"."""
    return sorted(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)


def captioned_shapes(num_images: int = 512, resolution: int = 16, seed: int = 0) -> DataSource:
    """Built-in captioned images (no download): one coloured shape on grey per image, caption "a <colour> <shape>"
    (the preferred images of ``fdistill.data.preference.shape_preferences``). ``extras["prompts"]`` lists the
    distinct captions (prompts of sample grids)."""
    if num_images < 1 or resolution < 8:
        raise ValueError(f"data.num_images must be >= 1 and data.resolution >= 8, got {num_images}, {resolution}")
    shapes = generate_shape_pairs(num_images, resolution, seed=seed)
    return DataSource(CaptionedImages(shapes["captions"], shapes["x_w"]), (3, resolution, resolution),
                      name="captioned-shapes", extras={"prompts": shape_prompts()})


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; lines starting with '#' are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r}: no such prompt file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"data.path={str(path)!r} holds no prompts (one prompt per line; '#' starts a comment)")
    return prompts


def prompt_file(path: str) -> DataSource:
    """Prompts only, one per line of ``path`` (no images; ``sample_shape`` is empty)."""
    prompts = read_prompts(path)
    return DataSource(CaptionedImages(prompts), (), name=f"prompts:{Path(path).name}",
                      extras={"prompts": prompts[:16]})
