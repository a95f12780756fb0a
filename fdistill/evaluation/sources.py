"""Image sources -> preprocessed batches -> streaming feature statistics.

Every source yields network-ready batches (``extractor.preprocess`` already applied); ``extract`` turns them into a
``FeatureStats`` (memory independent of the sample count) and, only when asked (KID, precision/recall), the features.

    folder_batches     image files under a folder (recursive, sorted, clean-fid's extensions); decoding and the
                       batched resize run in data-loader workers
    npz_batches        an npz of images: uint8 [N, H, W, C] (EDM / guided-diffusion layout) or [N, C, H, W],
                       or float in [-1, 1]
    tensor_batches     any iterable of tensors / batch dicts with "x" (uint8, or float in [-1, 1])
    dataset_batches    a torch Dataset of batch dicts (fdistill DataSource.dataset)
    generator_batches  ``generate_fn(num, generator[, cond]) -> [-1, 1] images``; exactly class-balanced labels for
                       conditional models, prompts cycled for text-to-image models
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..images import GRID_FILENAME
from .extractors import FeatureExtractor
from .frechet import FeatureStats
from .preprocess import quantize_to_uint8

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path as clean-fid does; the preview grid that
    ``fdistill sample`` writes at the folder's top level is not a sample and is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                   and p != folder / GRID_FILENAME)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return files


def read_image(path: Path) -> Tensor:
    """uint8 [3, H, W] (PIL ``convert('RGB')``, as clean-fid reads files)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


class _FileBatches(torch.utils.data.Dataset):
    """Item i = preprocessed batch i of the file list (so workers decode and resize whole batches)."""

    def __init__(self, files: Sequence[Path], batch_size: int, preprocess: Callable[[Tensor], Tensor]):
        self.files, self.batch_size, self.preprocess = list(files), batch_size, preprocess

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, index: int) -> Tensor:
        images = [read_image(p) for p in self.files[index * self.batch_size:(index + 1) * self.batch_size]]
        if all(image.shape == images[0].shape for image in images):
            return self.preprocess(torch.stack(images))
        return torch.cat([self.preprocess(image[None]) for image in images])     # mixed sizes: one at a time


def folder_batches(folder, preprocess, batch_size: int = 64, workers: int = 0,
                   num: int | None = None) -> Iterator[Tensor]:
    """Preprocessed batches of the first ``num`` (default all) images of ``folder``."""
    files = list_images(folder)[:num]
    loader = torch.utils.data.DataLoader(_FileBatches(files, batch_size, preprocess), batch_size=None,
                                         num_workers=workers, persistent_workers=False)
    yield from loader


def _npz_images(path) -> np.ndarray:
    with np.load(path) as data:
        key = next((k for k in ("images", "arr_0", "x", "samples") if k in data.files), None)
        if key is None:
            raise ValueError(f"{path}: no image array (keys images / arr_0 / x / samples); has {data.files}")
        return data[key]


def _to_uint8_nchw(images) -> Tensor:
    """uint8 or [-1, 1] float, [N, C, H, W] or [N, H, W, C] (C in 1, 3, 4) -> uint8 [N, C, H, W]."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D [N, C, H, W] or [N, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.permute(0, 3, 1, 2)
    return images if images.dtype == torch.uint8 else quantize_to_uint8(images)


def npz_batches(path, preprocess, batch_size: int = 64, num: int | None = None) -> Iterator[Tensor]:
    images = _npz_images(path)[:num]
    for start in range(0, len(images), batch_size):
        yield preprocess(_to_uint8_nchw(images[start:start + batch_size]))


def tensor_batches(batches: Iterable, preprocess, num: int | None = None) -> Iterator[Tensor]:
    """Preprocessed batches from tensors or dicts with "x" (uint8 or [-1, 1] float), truncated at ``num`` images."""
    remaining = math.inf if num is None else num
    for batch in batches:
        images = batch["x"] if isinstance(batch, dict) else batch
        images = _to_uint8_nchw(images[: int(min(remaining, len(images)))])
        remaining -= len(images)
        yield preprocess(images)
        if remaining <= 0:
            return


def dataset_batches(dataset, preprocess, batch_size: int = 64, workers: int = 0, num: int | None = None):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return tensor_batches(loader, preprocess, num)


def balanced_labels(num: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """[num] long labels, each class exactly floor or ceil(num / num_classes) times, in a seeded random order."""
    return (torch.arange(num) % num_classes)[torch.randperm(num, generator=generator)]


def generator_batches(generate_fn: Callable, preprocess, num: int, batch_size: int = 64, seed: int = 0,
                      num_classes: int | None = None, prompts: Sequence[str] | None = None) -> Iterator[Tensor]:
    """Preprocessed batches of ``num`` samples of ``generate_fn(n, generator[, cond])`` (images in [-1, 1]).

    Conditional models (``num_classes``) get exactly balanced labels as ``cond``; text-to-image models get
    ``prompts`` cycled in order as ``cond`` (a list of strings). One seeded generator drives all draws.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(num, num_classes, generator) if num_classes else None
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        if labels is not None:
            images = generate_fn(count, generator, labels[start:start + count])
        elif prompts:
            images = generate_fn(count, generator, [prompts[i % len(prompts)] for i in range(start, start + count)])
        else:
            images = generate_fn(count, generator)
        yield preprocess(_to_uint8_nchw(images.detach().cpu()))


@dataclass
class Extracted:
    """Statistics of a source and, when collected, its features [N, d] float32."""
    stats: FeatureStats
    features: Tensor | None = None


def extract(batches: Iterable[Tensor], extractor: FeatureExtractor, device="cpu", collect: bool = False,
            progress: bool = False, total: int | None = None, description: str = "features") -> Extracted:
    """Run ``extractor`` over preprocessed batches; accumulate float64 statistics (and features if ``collect``)."""
    from tqdm.auto import tqdm

    stats, kept = FeatureStats(), []
    with tqdm(total=total, desc=description, unit="img", disable=not progress) as bar:
        for batch in batches:
            features = extractor.features(batch, device)
            stats.update(features)
            if collect:
                kept.append(features)
            bar.update(len(features))
    if stats.num == 0:
        raise ValueError(f"{description}: the source yielded no images")
    return Extracted(stats, torch.cat(kept) if collect else None)
