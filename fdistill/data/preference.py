"""Preference pairs for Diffusion-DPO: the Pick-a-Pic layout and a built-in generated data set with a known rule.

An item is a dict:
    "x_w", "x_l": [3, H, W] float32 in [-1, 1], the preferred image first (pairs are flipped when label_1 wins),
    "caption": str (replaced by "" with probability ``empty_caption_prob``, as in the paper: 20 % by default),
    "original_size": [2] long (H, W of the stored image), "crop_top_left": [2] long (SDXL micro-conditioning).

Pick-a-Pic v2 columns (Kirstain et al. 2023): jpg_0, jpg_1 (encoded image bytes), label_0, label_1 (1 / 0, or
0.5 / 0.5 for a tie), caption. Only rows with label_0 in {0, 1} are kept, as in the released Diffusion-DPO training
code: ties (label_0 == 0.5, about 12 % of v2) carry no preference, and any other value (NaN, a missing label, a
soft label) is no clear one. Both are dropped, counted in ``source.extras["stats"]`` and reported once when the
data set is built.
"""
from __future__ import annotations

import glob
import io
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataSource
from .preference_rules import (COLOURS, PREFERENCE_RULES, SHAPES, caption_colour_accuracy,  # noqa: F401 (public names)
                               generate_shape_pairs, image_colours, shape_colour_reward)

PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}


# ------------------------------------------------------------------------------------------ transforms

def decode_image(value: Any, row: int, column: str) -> Tensor:
    """An image cell (bytes, {"bytes": ...} or a PIL image) -> [3, H, W] float32 in [-1, 1].

    Raises ValueError naming the row and column when the cell is missing or not a decodable image.
    """
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None or (isinstance(value, (bytes, bytearray)) and len(value) == 0):
        raise ValueError(f"preference data: row {row}, column {column!r}: the image is missing")
    try:
        image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))
        image.load()
    except Exception as error:  # PIL raises several types for corrupt files
        raise ValueError(f"preference data: row {row}, column {column!r}: cannot decode the image ({error})") from error
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def resize_shorter_side(image: Tensor, size: int) -> Tensor:
    """[C, H, W] -> [C, H', W'] with min(H', W') = size, aspect ratio kept (bilinear, antialiased)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    return F.interpolate(image[None], size=new_size, mode="bilinear", antialias=True, align_corners=False)[0]


def crop_offsets(height: int, width: int, size: int, random_crop: bool) -> tuple[int, int]:
    """(top, left) of a size x size crop: uniform at random, or centred."""
    if random_crop:
        return int(torch.randint(height - size + 1, ())), int(torch.randint(width - size + 1, ()))
    return (height - size) // 2, (width - size) // 2


def pair_transform(x_w: Tensor, x_l: Tensor, size: int, random_crop: bool, random_flip: bool) -> dict[str, Tensor]:
    """Resize both images, then apply ONE crop and ONE horizontal flip to the pair (the two images of a pair must
    stay comparable). Returns x_w, x_l [3, size, size] and the SDXL micro-conditioning of the pair."""
    original_size = torch.tensor(x_w.shape[-2:])
    x_w, x_l = resize_shorter_side(x_w, size), resize_shorter_side(x_l, size)
    if x_w.shape != x_l.shape:
        x_l = F.interpolate(x_l[None], size=x_w.shape[-2:], mode="bilinear", align_corners=False)[0]
    top, left = crop_offsets(*x_w.shape[-2:], size, random_crop)
    x_w, x_l = (x[:, top:top + size, left:left + size] for x in (x_w, x_l))
    if random_flip and bool(torch.rand(()) < 0.5):
        x_w, x_l = x_w.flip(-1), x_l.flip(-1)
    return {"x_w": x_w.clamp(-1, 1), "x_l": x_l.clamp(-1, 1), "original_size": original_size,
            "crop_top_left": torch.tensor([top, left])}


def maybe_empty(caption: str, empty_caption_prob: float) -> str:
    """The caption, or "" with probability ``empty_caption_prob`` (trains the unconditional model for CFG)."""
    return "" if empty_caption_prob > 0 and bool(torch.rand(()) < empty_caption_prob) else caption


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1], got {value}")


# ------------------------------------------------------------------------------------------ Pick-a-Pic

def preference_rows(label_0: list[Any]) -> tuple[list[int], list[bool], dict[str, int]]:
    """Rows with a strict preference (label_0 in {0, 1}), whether each row's winner is image 1 (label_0 == 0), and
    the dropped rows counted: {"ties_dropped": label_0 == 0.5, "labels_dropped": any other value (NaN, None, ...)}."""
    rows, flipped, dropped = [], [], {"ties_dropped": 0, "labels_dropped": 0}
    for row, label in enumerate(label_0):
        if label in (0, 1):                 # NaN compares unequal to everything, None equals neither
            rows.append(row)
            flipped.append(label == 0)
        else:
            dropped["ties_dropped" if label == 0.5 else "labels_dropped"] += 1
    return rows, flipped, dropped


def describe_stats(name: str, stats: dict[str, int]) -> str:
    """One line reporting how many rows of a preference data set were kept and why the others were dropped."""
    return (f"{name}: {stats['pairs']} pairs kept of {stats['rows']} rows ({stats['ties_dropped']} ties, "
            f"{stats['labels_dropped']} rows with label_0 not in {{0, 1}}, {stats['bad_skipped']} unreadable pairs "
            f"dropped)")


class PickAPicPairs(Dataset):
    """Preference pairs of a Hugging Face dataset in the Pick-a-Pic layout (see the module docstring)."""

    def __init__(self, table, resolution: int, random_crop: bool = False, random_flip: bool = True,
                 empty_caption_prob: float = 0.2, skip_bad: bool = False):
        missing = [c for c in PICKAPIC_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"preference data lacks the Pick-a-Pic columns {missing} (has {table.column_names})")
        _check_probability("empty_caption_prob", empty_caption_prob)
        self.table, self.resolution = table, resolution
        self.random_crop, self.random_flip, self.empty_caption_prob = random_crop, random_flip, empty_caption_prob
        self.rows, self.flipped, dropped = preference_rows(list(table["label_0"]))
        self.stats = {"rows": len(table), **dropped, "bad_skipped": 0}
        if skip_bad:
            self._drop_bad_rows()
        self.stats["pairs"] = len(self.rows)

    def _drop_bad_rows(self) -> None:
        """Decode every pair once and forget those with a missing or corrupt image (counted in stats)."""
        keep = []
        for index, row in enumerate(self.rows):
            try:
                self._images(row)
                keep.append(index)
            except ValueError:
                self.stats["bad_skipped"] += 1
        self.rows = [self.rows[i] for i in keep]
        self.flipped = [self.flipped[i] for i in keep]

    def _images(self, row: int) -> tuple[Tensor, Tensor]:
        record = self.table[row]
        return decode_image(record["jpg_0"], row, "jpg_0"), decode_image(record["jpg_1"], row, "jpg_1")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image_0, image_1 = self._images(row)
        x_w, x_l = (image_1, image_0) if self.flipped[index] else (image_0, image_1)
        item = pair_transform(x_w, x_l, self.resolution, self.random_crop, self.random_flip)
        item["caption"] = maybe_empty(self.table[row]["caption"] or "", self.empty_caption_prob)
        return item


def load_table(path: str, split: str = "train", data_files: str | list[str] | None = None):
    """A Hugging Face ``datasets.Dataset``: local parquet/arrow files (a file, a glob, or a directory of them) or a
    hub id / dataset script loaded with ``load_dataset(path, split=split)``."""
    import datasets

    if data_files is None and os.path.isdir(path):
        data_files = sorted(f for ext in LOCAL_FORMATS for f in glob.glob(os.path.join(path, "**", "*" + ext),
                                                                          recursive=True)) or None
    elif data_files is None and os.path.splitext(path)[1] in LOCAL_FORMATS:
        data_files = path
    if data_files is None:
        return datasets.load_dataset(path, split=split)
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    formats = {LOCAL_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"data.data_files must all be one of {sorted(LOCAL_FORMATS)} files, got {files[:3]}")
    return datasets.load_dataset(formats.pop(), data_files=files, split="train")


def pickapic(path: str = "yuvalkirstain/pickapic_v2", split: str = "train", data_files: str | list[str] | None = None,
             resolution: int = 512, random_crop: bool = False, random_flip: bool = True,
             empty_caption_prob: float = 0.2, skip_bad: bool = False, max_pairs: int | None = None) -> DataSource:
    """Pick-a-Pic preference pairs (hub id or local parquet/arrow files): rows with label_0 in {0, 1} only (ties
    and other labels dropped and counted), winner first. The counts are printed and kept in
    ``extras["stats"]``.

    Args:
        path: hub id, a local parquet/arrow file, or a directory of them.
        split: split of a hub dataset.
        data_files: explicit local files (overrides the discovery from ``path``).
        resolution: output side (shorter side resized, then a square crop).
        random_crop: random instead of centre crop; random_flip: horizontal flip of the whole pair half the time.
        empty_caption_prob: share of captions replaced by "" (paper: 0.2).
        skip_bad: drop (and count) pairs whose images are missing or corrupt instead of failing on them.
        max_pairs: keep only the first rows of the table (quick runs).
    """
    if resolution < 8:
        raise ValueError(f"data.resolution must be >= 8, got {resolution}")
    table = load_table(path, split, data_files)
    if max_pairs is not None:
        table = table.select(range(min(max_pairs, len(table))))
    pairs = PickAPicPairs(table, resolution, random_crop, random_flip, empty_caption_prob, skip_bad)
    name = f"pickapic:{path}"
    print(describe_stats(name, pairs.stats))     # how much of the table trains is part of the recipe: always shown
    return DataSource(pairs, (3, resolution, resolution), 0, name=name, extras={"stats": pairs.stats})


# ------------------------------------------------------------------------------------------ built-in pairs

class GeneratedPairs(Dataset):
    """In-memory preference pairs (tensors x_w, x_l and captions) with the item layout of the module docstring."""

    def __init__(self, x_w: Tensor, x_l: Tensor, captions: list[str], empty_caption_prob: float = 0.0):
        _check_probability("empty_caption_prob", empty_caption_prob)
        self.x_w, self.x_l, self.captions, self.empty_caption_prob = x_w, x_l, captions, empty_caption_prob

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = torch.tensor(self.x_w.shape[-2:])
        return {"x_w": self.x_w[index], "x_l": self.x_l[index], "caption": maybe_empty(self.captions[index],
                self.empty_caption_prob), "original_size": size, "crop_top_left": torch.zeros(2, dtype=torch.long)}


SPLIT_SEEDS = {"train": 0, "test": 1}


def shape_preferences(num_pairs: int = 512, resolution: int = 16, split: str = "train",
                      empty_caption_prob: float = 0.0, rule: str = "colour", seed: int = 0) -> DataSource:
    """Built-in generated preference pairs (no download): coloured shapes, the winner chosen by a known ``rule``
    ('colour': the caption names the preferred colour; 'brightness': the brighter picture wins; 'size': the
    larger shape wins, caption unchanged; ``fdistill.data.preference_rules``).

    ``split`` 'train' and 'test' draw disjoint random streams (held-out pairs for the implicit reward accuracy).
    ``extras["reward"]`` is the rule as a scorer (``reward(images, captions) -> [B]``) and ``extras["prompts"]``
    the distinct captions (fixed prompts for reward-of-samples evaluation).
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"data.split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if num_pairs < 1 or resolution < 8:
        raise ValueError(f"data.num_pairs must be >= 1 and data.resolution >= 8, got {num_pairs}, {resolution}")
    pairs = generate_shape_pairs(num_pairs, resolution, seed=2 * seed + SPLIT_SEEDS[split], rule=rule)
    dataset = GeneratedPairs(pairs["x_w"], pairs["x_l"], pairs["captions"], empty_caption_prob)
    prompts = sorted(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
    return DataSource(dataset, (3, resolution, resolution), 0, name=f"shape-preferences-{rule}-{split}",
                      extras={"reward": PREFERENCE_RULES[rule][1], "prompts": prompts,
                              "stats": {"rows": num_pairs, "ties_dropped": 0, "labels_dropped": 0, "bad_skipped": 0,
                                        "pairs": num_pairs}})


def all_images_as_winners(source: DataSource, empty_caption_prob: float = 0.1) -> DataSource:
    """Every image of a built-in pair source as a 'winner' (2N pairs). SFT on it is plain denoising on all the
    images: it pre-trains an UNBIASED reference (as likely to draw a pair's loser as its winner)."""
    pairs = source.dataset
    mixed = GeneratedPairs(torch.cat([pairs.x_w, pairs.x_l]), torch.cat([pairs.x_l, pairs.x_w]), pairs.captions * 2,
                           empty_caption_prob)
    return DataSource(mixed, source.sample_shape, name=f"{source.name}-all-images", extras=source.extras)
