"""FID / KID / precision-recall between a generated source and a reference, and reference statistics.

Sources (``gen`` and ``ref``): an image folder, an npz of images, a tensor or iterable of batches, a torch Dataset,
or (``gen`` only) a ``generate_fn(num, generator[, cond])``. References may also be statistics:

- an npz with ``mu`` / ``sigma`` (as written by ``FeatureStats.save`` or clean-fid),
- ``"digits"``: the full sklearn digits dataset, with the digits feature network,
- a clean-fid name ``"name/split/res"`` (e.g. ``cifar10/train/32``): clean-fid's file
  ``{name}_{mode}[_{model}]_{split}_{res}.npz`` from its stats folder or fdistill's cache, downloaded when online.

Statistics of a reference folder / npz are cached as npz (mu, sigma, num) under ``~/.cache/fdistill/stats``, keyed by
the files (paths, sizes, modification times), the extractor's name and weights (``FeatureExtractor.weights_id``: a
content hash, or open_clip's pretrained tag), its preprocessing and the mode. An unreadable cache file is recomputed;
a cache that cannot be written is skipped with a warning.

Float images in an npz need their value range stated (``SourceOptions.float_range``, ``--float-range``); non-finite
images or statistics are errors naming the file, and so is a non-finite FID.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .extractors import FeatureExtractor, build_feature_extractor, describe_preprocess
from .frechet import frechet_distance, load_statistics, save_statistics
from .inception import cache_dir, download
from .metrics import kernel_inception_distance, precision_recall
from .sources import (Extracted, dataset_batches, extract, folder_batches, generator_batches, list_images,
                      npz_batches, tensor_batches)

CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"


@dataclass
class Statistics:
    """Gaussian statistics of a feature set: mu [d], sigma [d, d] float64, num samples, optional features [n, d]."""
    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: torch.Tensor | None = None

    @classmethod
    def from_extracted(cls, extracted: Extracted) -> "Statistics":
        stats = extracted.stats
        return cls(stats.mean, stats.cov, stats.num, extracted.features)


@dataclass
class SourceOptions:
    """How sources are read: images per batch, data-loader workers, device, progress bar, seed, labels or prompts
    of a generate_fn, and ``float_range`` (a key of ``sources.FLOAT_RANGES``) of float images in an npz."""
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    progress: bool = False
    seed: int = 0
    num_classes: int | None = None
    prompts: list[str] | None = None
    float_range: str | None = None


def _is_statistics_npz(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "mu" in data.files and "sigma" in data.files
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: unreadable npz ({error})") from error


def source_batches(source, extractor: FeatureExtractor, num: int | None, options: SourceOptions):
    """Preprocessed batches of any supported image source (see module docstring)."""
    preprocess, batch = extractor.preprocess, options.batch_size
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return folder_batches(path, preprocess, batch, options.workers, num)
        if path.suffix == ".npz" and path.is_file():
            return npz_batches(path, preprocess, batch, num, options.float_range)
        raise FileNotFoundError(f"{path}: not an image folder or an npz file")
    if isinstance(source, torch.Tensor):
        return tensor_batches(source.split(batch), preprocess, num)
    if callable(source) and not isinstance(source, torch.utils.data.Dataset):
        if num is None:
            raise ValueError("a generate_fn source needs num (how many samples to draw)")
        return generator_batches(source, preprocess, num, batch, options.seed, options.num_classes, options.prompts)
    if isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        return dataset_batches(source, preprocess, batch, options.workers, num)
    return tensor_batches(source, preprocess, num)


def source_count(source, num: int | None) -> int | None:
    """How many images ``source`` yields when known without reading them (the progress bar's total, for an ETA):
    ``num``, else a folder's image count or a tensor's length; None otherwise."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        count = len(list_images(source))
    elif isinstance(source, torch.Tensor):
        count = len(source)
    else:
        return num
    return count if num is None else min(num, count)


def source_statistics(source, extractor: FeatureExtractor, num: int | None = None, collect: bool = False,
                      options: SourceOptions | None = None, description: str = "features") -> Statistics:
    options = options or SourceOptions()
    batches = source_batches(source, extractor, num, options)
    extracted = extract(batches, extractor, options.device, collect, options.progress, source_count(source, num),
                        description)
    return Statistics.from_extracted(extracted)


def named_statistics_filename(name: str, mode: str, extractor_name: str) -> str:
    """clean-fid's file name for ``name/split/res`` statistics, e.g. ``cifar10_clean_train_32.npz``."""
    parts = name.split("/")
    if len(parts) != 3:
        raise ValueError(f"named statistics must look like 'name/split/res' (e.g. cifar10/train/32), got {name!r}")
    dataset, split, resolution = parts
    modifier = "" if extractor_name == "inception" else f"_{extractor_name}"
    return f"{dataset}_{mode}{modifier}_{split}_{resolution}.npz".lower()


def named_statistics_path(name: str, mode: str, extractor_name: str, allow_download: bool = True) -> Path:
    """Local path of clean-fid's named statistics: clean-fid's stats folder, fdistill's cache, or downloaded."""
    import cleanfid

    filename = named_statistics_filename(name, mode, extractor_name)
    folders = [Path(cleanfid.__file__).parent / "stats", cache_dir() / "stats"]
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    url = f"{CLEANFID_STATS_URL}/{filename}"
    if allow_download:
        try:
            return download(url, folders[1] / filename)
        except OSError as error:
            reason = f"download from {url} failed ({error})"
    else:
        reason = "downloads disabled"
    raise FileNotFoundError(f"reference statistics {filename} for {name!r} not found and {reason}; put the file "
                            f"in {folders[0]} or {folders[1]} (or pass the npz path as the reference)")


def _statistics_file(path: Path) -> Statistics:
    """Statistics from an npz with mu, sigma and optionally num (0 when absent, as in clean-fid's files)."""
    mu, sigma = load_statistics(path)
    with np.load(path) as data:
        return Statistics(mu, sigma, int(data["num"]) if "num" in data.files else 0)


def _folder_cache_key(source: Path, extractor: FeatureExtractor, mode: str, num: int | None,
                      float_range: str | None) -> str:
    """Hash of what the statistics depend on: the files, the extractor's weights and preprocessing, the mode."""
    files = list_images(source)[:num] if source.is_dir() else [source]
    described = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps([described, extractor.name, extractor.weights_id, describe_preprocess(extractor.preprocess),
                          mode, num, float_range])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _cached_statistics(path: Path) -> Statistics | None:
    """Statistics from the cache, or None when the file is missing or unreadable (it is then recomputed)."""
    if not path.is_file():
        return None
    try:
        return _statistics_file(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _store_statistics(path: Path, statistics: Statistics) -> None:
    """Write the cache; a failed write (disk full, read-only cache) costs only a recomputation next time."""
    try:
        save_statistics(path, statistics.mu, statistics.sigma, statistics.num)
    except OSError as error:
        print(f"warning: reference statistics not cached ({path}: {error})", file=sys.stderr)


def reference_statistics(reference, extractor: FeatureExtractor, mode: str = "clean", num: int | None = None,
                         collect: bool = False, options: SourceOptions | None = None, cache: bool = True) -> Statistics:
    """Statistics of a reference (see module docstring). ``collect`` (KID, precision/recall) needs an image source."""
    from .digits import digits_images, digits_reference_statistics

    path = Path(reference) if isinstance(reference, (str, os.PathLike)) else None
    if isinstance(reference, str) and reference == "digits":
        if collect or extractor.name != "digits":
            images = ((digits_images()[0] + 1) * 127.5).round().to(torch.uint8)
            return source_statistics(images, extractor, num, collect, options, "reference")
        mu, sigma = digits_reference_statistics()
        return Statistics(mu, sigma, 1797)
    if path is not None and (_is_statistics_npz(path) or (not path.exists() and str(reference).count("/") == 2)):
        if collect:
            raise ValueError(f"KID / precision-recall need reference images, but {reference} holds only statistics")
        stats_path = path if _is_statistics_npz(path) else named_statistics_path(str(reference), mode, extractor.name)
        return _statistics_file(stats_path)
    if path is None or collect or not cache or extractor.name == "custom":
        return source_statistics(reference, extractor, num, collect, options, "reference")
    options = options or SourceOptions()
    key = _folder_cache_key(path, extractor, mode, num, options.float_range)
    cached = cache_dir() / "stats" / f"{path.stem}_{key}.npz"
    if (statistics := _cached_statistics(cached)) is not None:
        return statistics
    statistics = source_statistics(reference, extractor, num, False, options, "reference")
    _store_statistics(cached, statistics)
    return statistics


def compute_metrics(gen, ref, features="inception", mode: str = "clean", num: int | None = None,
                    ref_num: int | None = None, kid: bool = False, pr: bool = False,
                    options: SourceOptions | None = None, extractor_options: dict | None = None,
                    cache: bool = True) -> dict[str, float]:
    """FID (and KID mean/std, precision/recall when asked) of ``gen`` against ``ref``; see the module docstring.

    ``features``: "inception" | "digits" | "clip" | an nn.Module | a FeatureExtractor. Returns a dict with
    ``fid``, ``num_gen``, ``num_ref`` and optionally ``kid``, ``kid_std``, ``precision``, ``recall``.
    """
    options = options or SourceOptions()
    extractor = build_feature_extractor(features, mode, **(extractor_options or {})).to(options.device)
    collect = kid or pr
    reference = reference_statistics(ref, extractor, mode, ref_num, collect, options, cache)
    generated = source_statistics(gen, extractor, num, collect, options, "generated")
    fid = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
    if not math.isfinite(fid):
        raise ValueError(f"FID is {fid}: the features of {gen if isinstance(gen, (str, os.PathLike)) else 'gen'} or "
                         f"{ref if isinstance(ref, (str, os.PathLike)) else 'ref'} are not finite")
    result = {"fid": fid, "num_gen": generated.num, "num_ref": reference.num}
    if kid:
        result["kid"], result["kid_std"] = kernel_inception_distance(generated.features, reference.features,
                                                                     seed=options.seed)
    if pr:
        result["precision"], result["recall"] = precision_recall(reference.features, generated.features)
    return result


def evaluate_generator(generate_fn: Callable, reference="digits", features="digits", num: int = 1000,
                       mode: str = "clean", kid: bool = False, pr: bool = False,
                       options: SourceOptions | None = None, extractor_options: dict | None = None) -> dict[str, float]:
    """Metrics of ``num`` samples of ``generate_fn(n, generator[, cond]) -> [-1, 1] images`` against ``reference``."""
    return compute_metrics(generate_fn, reference, features, mode, num, None, kid, pr, options, extractor_options)
