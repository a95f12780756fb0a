"""Image sources -> preprocessed batches -> streaming feature statistics.

Every source yields network-ready batches (``extractor.preprocess`` already applied); ``extract`` turns them into a
``FeatureStats`` (memory independent of the sample count) and, only when asked (KID, precision/recall), the features.

    folder_batches     image files under a folder (recursive, sorted, clean-fid's extensions); decoding and the
                       batched resize run in data-loader workers
    npz_batches        an npz of images: uint8 [N, H, W, C] (EDM / guided-diffusion layout) or [N, C, H, W],
                       or float in a range the caller states (``FLOAT_RANGES``; checked against the values)
    tensor_batches     any iterable of tensors / batch dicts with "x" (uint8, or float in [-1, 1])
    dataset_batches    a torch Dataset of batch dicts (fdistill DataSource.dataset)
    generator_batches  ``generate_fn(num, generator[, cond]) -> [-1, 1] images``; exactly class-balanced labels for
                       conditional models, prompts cycled for text-to-image models

Every source is validated: non-finite values, integer images outside 0..255 and unreadable files are errors that name
the source; images of mixed sizes are preprocessed one at a time, as clean-fid resizes each image on its own.
"""
from __future__ import annotations

import math
import zipfile
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
    """uint8 [3, H, W] (PIL ``convert('RGB')``, as clean-fid reads files). A truncated or unreadable file is a
    ValueError naming it."""
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: unreadable image ({error})") from error


class _FileBatches(torch.utils.data.Dataset):
    """Item i = preprocessed batch i of the file list (so workers decode and resize whole batches)."""

    def __init__(self, files: Sequence[Path], batch_size: int, preprocess: Callable[[Tensor], Tensor]):
        self.files, self.batch_size, self.preprocess = list(files), batch_size, preprocess

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, index: int) -> Tensor:
        files = self.files[index * self.batch_size:(index + 1) * self.batch_size]
        images = [read_image(p) for p in files]
        if all(image.shape == images[0].shape for image in images):
            return self.preprocess(torch.stack(images))
        # mixed sizes: each image is resized to the extractor's input on its own, as clean-fid does
        inputs = [self.preprocess(image[None]) for image in images]
        if any(x.shape != inputs[0].shape for x in inputs):
            raise ValueError(f"{files[0].parent}: images of different sizes ({files[0].name}: "
                             f"{tuple(images[0].shape[1:])}) and this feature extractor has no fixed input size")
        return torch.cat(inputs)


def folder_batches(folder, preprocess, batch_size: int = 64, workers: int = 0,
                   num: int | None = None) -> Iterator[Tensor]:
    """Preprocessed batches of the first ``num`` (default all) images of ``folder``."""
    files = list_images(folder)[:num]
    loader = torch.utils.data.DataLoader(_FileBatches(files, batch_size, preprocess), batch_size=None,
                                         num_workers=workers, persistent_workers=False)
    yield from loader


# Value ranges float images may be stated to hold (uint8 images always hold 0..255).
FLOAT_RANGES: dict[str, tuple[float, float]] = {"0..1": (0.0, 1.0), "-1..1": (-1.0, 1.0), "0..255": (0.0, 255.0)}
# Float values may leave their range by this fraction of its width (resampling overshoot) and are then clipped.
RANGE_TOLERANCE = 0.01


class UnstatedRangeError(ValueError):
    """Float images whose value range the caller did not state (a usage error: the fix is an option)."""


def _npz_images(path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in ("images", "arr_0", "x", "samples") if k in data.files), None)
            if key is None:
                raise ValueError(f"{path}: no image array (keys images / arr_0 / x / samples); has {data.files}")
            return data[key]
    except (OSError, zipfile.BadZipFile) as error:                 # truncated or not an npz at all
        raise ValueError(f"{path}: unreadable npz ({error})") from error


def implied_float_range(low: float, high: float) -> str | None:
    """The narrowest of ``FLOAT_RANGES`` (0..1, then -1..1, then 0..255) that holds [low, high] up to
    ``RANGE_TOLERANCE`` of its width; None when none does."""
    for name, (start, stop) in FLOAT_RANGES.items():
        slack = RANGE_TOLERANCE * (stop - start)
        if start - slack <= low and high <= stop + slack:
            return name
    return None


class NonFiniteImagesError(ValueError):
    """Images with NaN / inf values (a diverged model, or a broken file)."""


def _require_finite(images: Tensor | np.ndarray, source: str) -> None:
    finite = np.isfinite(images) if isinstance(images, np.ndarray) else torch.isfinite(images)
    if not finite.all():
        raise NonFiniteImagesError(f"{source}: {int((~finite).sum())} non-finite values (NaN / inf) in the images")


def _require_byte_integers(images: Tensor | np.ndarray, source: str) -> None:
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise ValueError(f"{source}: integer images must hold 0..255, got values {low} .. {high}")


def npz_value_range(images: np.ndarray, source: str, float_range: str | None) -> tuple[float, float] | None:
    """Validate an npz's image array; returns the (low, high) range its floats map from, None for integers.

    Integers must hold 0..255. Floats must be finite, ``float_range`` (a key of ``FLOAT_RANGES``) must be stated,
    and it must be the narrowest allowed range that holds the values: 0..1 data stated as 0..255 (or -1..1) is
    refused, as is anything outside every allowed range.
    """
    if images.dtype == np.uint8 or images.size == 0:
        return None
    if np.issubdtype(images.dtype, np.integer):
        _require_byte_integers(images, source)
        return None
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{source}: images of dtype {images.dtype}; allowed: uint8 (0..255) or floats")
    _require_finite(images, source)
    low, high = float(images.min()), float(images.max())
    implied = implied_float_range(low, high)
    values = f"float images ({images.dtype}, values {low:.4g} .. {high:.4g})"
    if float_range is None:
        hint = f"--float-range={implied}" if implied else "--float-range=RANGE"
        raise UnstatedRangeError(f"{source}: {values} need their range stated: pass {hint} (allowed: "
                                 f"{', '.join(FLOAT_RANGES)}; Python: SourceOptions(float_range=...)) or save uint8")
    if float_range not in FLOAT_RANGES:
        raise ValueError(f"float range {float_range!r} not allowed; allowed: {', '.join(FLOAT_RANGES)}")
    if implied != float_range:
        looks = f"they look like {implied}" if implied else "no allowed range holds them (clip them first)"
        raise ValueError(f"{source}: {values} do not fit the stated range {float_range}: {looks}")
    return FLOAT_RANGES[float_range]


def _to_uint8_nchw(images, source: str = "images", value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """uint8, integer 0..255 or float images in ``value_range`` (clipped), [N, C, H, W] or [N, H, W, C]
    (C in 1, 3, 4) -> uint8 [N, C, H, W]. Non-finite values and integers outside 0..255 are errors."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"{source}: images must be 4-D [N, C, H, W] or [N, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        _require_byte_integers(images, source)
        return images.to(torch.uint8)
    _require_finite(images, source)
    low, high = value_range
    if (low, high) != (-1.0, 1.0):
        images = (images.float() - low) * (2 / (high - low)) - 1
    return quantize_to_uint8(images)


def npz_batches(path, preprocess, batch_size: int = 64, num: int | None = None,
                float_range: str | None = None) -> Iterator[Tensor]:
    """Preprocessed batches of the first ``num`` images of an npz (validated first, see ``npz_value_range``)."""
    images = _npz_images(path)[:num]
    value_range = npz_value_range(images, str(path), float_range) or (-1.0, 1.0)
    for start in range(0, len(images), batch_size):
        yield preprocess(_to_uint8_nchw(images[start:start + batch_size], str(path), value_range))


def tensor_batches(batches: Iterable, preprocess, num: int | None = None, source: str = "images") -> Iterator[Tensor]:
    """Preprocessed batches from tensors or dicts with "x" (uint8 or [-1, 1] float), truncated at ``num`` images;
    ``source`` names them in errors."""
    remaining = math.inf if num is None else num
    for batch in batches:
        images = batch["x"] if isinstance(batch, dict) else batch
        images = _to_uint8_nchw(images[: int(min(remaining, len(images)))], source)
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
        yield preprocess(_to_uint8_nchw(images.detach().cpu(), f"generated images {start} .. {start + count - 1}"))


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
