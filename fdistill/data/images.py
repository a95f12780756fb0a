"""Image data sources: a folder of image files, or a Hugging Face dataset (hub id, local directory or files).

Both decode lazily (in ``Dataset.__getitem__``, so big folders cost only their file list in memory) and produce
items ``{"x": [C, R, R] float32 in [-1, 1], "label": long}`` (label only when labels are on). Every image is
resized so its shorter side is ``resolution`` (bicubic) and center-cropped to ``resolution`` x ``resolution``;
``channels`` 3 converts to RGB, 1 to grayscale (PIL "L").

Bad images: with ``skip_bad=False`` a corrupt or unreadable file raises ``BadImageError`` naming it. With
``skip_bad=True`` every file is decoded once when the source is built (one pass; the tensors are not kept), bad ones are dropped, counted in ``dataset.skipped`` (their names in ``dataset.skipped_files``)
and the count is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataSource

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIL_MODES = {1: "L", 3: "RGB"}
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises on corrupt data


class BadImageError(ValueError):
    """An image file (or dataset row) that cannot be decoded; the message names it."""


def _check_options(resolution: int, channels: int) -> None:
    if resolution <= 0:
        raise ValueError(f"data.resolution must be a positive number of pixels, got {resolution}")
    if channels not in PIL_MODES:
        raise ValueError(f"data.channels must be one of {tuple(PIL_MODES)} (grayscale or RGB), got {channels}")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is ``resolution`` (bicubic), then crop the central ``resolution`` square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: Image.Image, resolution: int, channels: int) -> Tensor:
    """A PIL image -> [channels, resolution, resolution] float32 in [-1, 1] (uint8 v -> v / 127.5 - 1)."""
    image = resize_center_crop(image.convert(PIL_MODES[channels]), resolution)
    pixels = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


def decode_file(path: Path, resolution: int, channels: int) -> Tensor:
    """Decode one image file to [C, R, R] in [-1, 1]; a corrupt or unreadable file raises BadImageError naming it."""
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image, resolution, channels)
    except DECODE_ERRORS as error:
        raise BadImageError(f"cannot read image file {path}: {error}") from error


def is_readable_image(path: Path) -> bool:
    """Whether PIL fully decodes the file (a header check alone misses truncated files)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except DECODE_ERRORS:
        return False


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, by extension, case-insensitive), sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(root).as_posix())


class LazyImageDataset(Dataset):
    """Items ``{"x": decode(i)[, "label": labels[i]][, "caption": captions[i]]}`` decoded on access.

    Args:
        decode: ``index -> [C, R, R]`` tensor in [-1, 1] (raises BadImageError naming the bad file / row).
        count: number of items.
        labels: [count] long labels, or None.
        skipped_files: names of inputs dropped as unreadable (``skip_bad``); ``skipped`` is their count.
        captions: [count] text captions, or None.
    """

    def __init__(self, decode: Callable[[int], Tensor], count: int, labels: Tensor | None = None,
                 skipped_files: Sequence[str] = (), captions: Sequence[str] | None = None):
        self.decode, self.count, self.labels = decode, count, labels
        self.skipped_files = list(skipped_files)
        self.captions = None if captions is None else list(captions)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"x": self.decode(index)}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


def _drop_bad(names: list[str], readable: Callable[[int], bool], where: str) -> tuple[list[int], list[str]]:
    """Indices of readable inputs and names of the rest; logs the count of skipped ones."""
    ok = [readable(index) for index in range(len(names))]
    bad_names = [name for name, good in zip(names, ok) if not good]
    if bad_names:
        logger.warning("skipped %d unreadable image(s) in %s (first: %s)", len(bad_names), where, bad_names[0])
    return [index for index, good in enumerate(ok) if good], bad_names


def image_folder(root: str | Path, resolution: int = 32, channels: int = 3, labels: bool = False,
                 skip_bad: bool = False) -> DataSource:
    """Every image file under ``root`` (png/jpg/jpeg/webp/bmp, recursive, sorted by relative path).

    Args:
        root: the folder.
        resolution: output side in pixels (resize shorter side + center crop).
        channels: 3 (RGB) or 1 (grayscale).
        labels: class label = the top-level sub-folder an image lies in (classes sorted by name -> 0, 1, ...);
            every image must then lie in a sub-folder.
        skip_bad: drop (and count) unreadable files instead of raising BadImageError when one is read.
    """
    _check_options(resolution, channels)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a directory")
    paths = find_images(root)
    if skip_bad:
        keep, skipped = _drop_bad([str(p) for p in paths], lambda i: is_readable_image(paths[i]), str(root))
        paths = [paths[i] for i in keep]
    else:
        skipped = []
    if not paths:
        raise ValueError(f"data.root={str(root)!r} holds no readable image files ({', '.join(IMAGE_EXTENSIONS)})")
    label_tensor, class_names = folder_labels(root, paths) if labels else (None, [])
    dataset = LazyImageDataset(lambda i: decode_file(paths[i], resolution, channels), len(paths), label_tensor, skipped)
    dataset.paths = paths
    return DataSource(dataset, (channels, resolution, resolution), len(class_names), name=f"folder:{root.name}",
                      extras={"class_names": class_names})


def folder_labels(root: Path, paths: list[Path]) -> tuple[Tensor, list[str]]:
    """[N] labels from each path's top-level sub-folder under ``root`` and the sorted class names."""
    parts = [p.relative_to(root).parts for p in paths]
    loose = [str(p) for p, part in zip(paths, parts) if len(part) < 2]
    if loose:
        raise ValueError(f"data.labels=true needs every image in a class sub-folder of {root}; {loose[0]} is not")
    class_names = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[part[0]] for part in parts], dtype=torch.long), class_names


# ------------------------------------------------------------------------------------------ Hugging Face datasets
def load_hf_dataset(path: str, split: str, name: str | None, data_files: Any, data_dir: str | None):
    """``datasets`` Dataset from a hub id, a builder name with ``data_files`` ('parquet', 'imagefolder', ...), or a
    directory written by ``Dataset.save_to_disk``."""
    import datasets

    if Path(path).expanduser().is_dir() and (Path(path).expanduser() / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(Path(path).expanduser()))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(path, name=name, split=split, data_files=data_files, data_dir=data_dir)


def row_to_pil(value: Any, where: str) -> Image.Image:
    """A dataset cell (PIL image, {'bytes', 'path'} dict, file path or array) -> PIL image; BadImageError names it."""
    import io

    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str):
            return Image.open(value)
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    except DECODE_ERRORS as error:
        raise BadImageError(f"cannot decode the image of {where}: {error}") from error


def hf_labels(table, label_column: str) -> tuple[Tensor, int]:
    """[N] long labels and the number of classes (ClassLabel names, else max + 1)."""
    if label_column not in table.column_names:
        raise ValueError(f"data.label_column={label_column!r} is not a column of the dataset {table.column_names}")
    values = torch.as_tensor(np.asarray(table[label_column]), dtype=torch.long)
    feature = table.features[label_column]
    num_classes = getattr(feature, "num_classes", None) or int(values.max()) + 1
    return values, num_classes


def hf_images(path: str, split: str = "train", image_column: str = "image", label_column: str | None = None,
              resolution: int = 32, channels: int = 3, name: str | None = None, data_files: Any = None,
              data_dir: str | None = None, skip_bad: bool = False, caption_column: str | None = None) -> DataSource:
    """A Hugging Face dataset of images (``datasets.load_dataset(path, ...)`` or a ``save_to_disk`` directory).

    Args:
        path: hub id ('cifar10'), builder ('parquet', 'imagefolder') with ``data_files``/``data_dir``, or a local
            directory (a saved dataset or files ``load_dataset`` understands).
        split: the split to use.
        image_column: column holding images (Image feature, encoded bytes, file paths or arrays).
        label_column: optional column of integer class labels.
        caption_column: optional column of text captions (text-to-image data: items get ``"caption"``).
        resolution, channels, skip_bad: as in ``image_folder``; rows are named '<path>[split][row i]' in errors.
        name, data_files, data_dir: passed to ``datasets.load_dataset``.
    """
    import datasets

    _check_options(resolution, channels)
    table = load_hf_dataset(path, split, name, data_files, data_dir)
    if image_column not in table.column_names:
        raise ValueError(f"data.image_column={image_column!r} is not a column of {path!r} {table.column_names}")
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves: name bad rows

    def where(row: int) -> str:
        return f"{path}[{split}][row {row}]"

    rows = list(range(len(table)))
    skipped: list[str] = []
    if skip_bad:
        rows, skipped = _drop_bad([where(i) for i in rows], lambda i: hf_row_readable(table[i][image_column]), path)
    labels, num_classes = hf_labels(table, label_column) if label_column else (None, 0)
    if labels is not None:
        labels = labels[rows]
    captions = hf_captions(table, caption_column, rows) if caption_column else None
    if not rows:
        raise ValueError(f"data.path={path!r} split {split!r} holds no readable images")

    def decode(index: int) -> Tensor:
        row = rows[index]
        image = row_to_pil(table[row][image_column], where(row))
        try:
            return pil_to_tensor(image, resolution, channels)
        except DECODE_ERRORS as error:
            raise BadImageError(f"cannot decode the image of {where(row)}: {error}") from error

    dataset = LazyImageDataset(decode, len(rows), labels, skipped, captions)
    return DataSource(dataset, (channels, resolution, resolution), num_classes, name=f"hf:{path}:{split}")


def hf_captions(table, caption_column: str, rows: list[int]) -> list[str]:
    """The captions of ``rows`` (a list-valued cell, as in COCO's several captions per image, gives its first)."""
    if caption_column not in table.column_names:
        raise ValueError(f"data.caption_column={caption_column!r} is not a column of the dataset {table.column_names}")
    column = table[caption_column]
    return [str(value[0] if isinstance(value, (list, tuple)) and value else value or "") for value in
            (column[row] for row in rows)]


def hf_row_readable(value: Any) -> bool:
    """Whether one dataset cell decodes to an image."""
    try:
        row_to_pil(value, "").load()
        return True
    except DECODE_ERRORS:  # BadImageError is a ValueError
        return False
