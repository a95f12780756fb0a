"""clean-fid's Inception-v3 (the TorchScript port of TF's ``inception-2015-12-05``), with offline-friendly weights.

Weights are looked up, in order: the ``weights`` argument (``--inception-weights``), the environment variable
``FDISTILL_INCEPTION_WEIGHTS``, fdistill's cache (``~/.cache/fdistill/inception-2015-12-05.pt``), clean-fid's own
download location (``/tmp/inception-2015-12-05.pt``); if none exists the file is downloaded from ``INCEPTION_URL``
into fdistill's cache. Offline with no file -> ``FileNotFoundError`` saying exactly how to provide it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
WEIGHTS_ENV = "FDISTILL_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


def cache_dir() -> Path:
    """fdistill's cache folder: ``$FDISTILL_CACHE`` or ``~/.cache/fdistill``."""
    return Path(os.environ.get("FDISTILL_CACHE", Path.home() / ".cache" / "fdistill"))


def download(url: str, destination: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` atomically (temporary file, then rename)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, \
            tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as partial:
        shutil.copyfileobj(response, partial)
    os.replace(partial.name, destination)
    return destination


def inception_weights_path(weights: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Path of ``inception-2015-12-05.pt`` (see module docstring for the search order)."""
    explicit = weights or os.environ.get(WEIGHTS_ENV)
    if explicit:
        if not Path(explicit).is_file():
            source = "the weights argument" if weights else f"${WEIGHTS_ENV}"
            raise FileNotFoundError(f"Inception weights file {explicit} (from {source}) does not exist")
        return Path(explicit)
    candidates = [cache_dir() / INCEPTION_FILENAME, Path(tempfile.gettempdir()) / INCEPTION_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if allow_download:
        try:
            return download(INCEPTION_URL, candidates[0])
        except OSError as error:                                  # URLError, timeouts, DNS failures are OSErrors
            reason = f"download failed ({error})"
    else:
        reason = "downloads disabled"
    raise FileNotFoundError(
        f"Inception weights {INCEPTION_FILENAME} not found and {reason}. Provide the file in one of these ways: "
        f"pass --inception-weights PATH (Python: weights=PATH), set the environment variable {WEIGHTS_ENV}=PATH, "
        f"or download {INCEPTION_URL} to {candidates[0]} (or {candidates[1]}, where clean-fid keeps it)")


class InceptionFeatures(nn.Module):
    """Inception pool3 features [B, 2048] of images [B, 3, H, W] in [0, 255] (float), as clean-fid computes them.

    ``resize_inside=False`` (clean mode): inputs are already 299x299, normalised as (x - 128) / 128 and run through
    the network's layers. ``resize_inside=True`` (legacy_tensorflow): the TorchScript model resizes internally.
    """

    def __init__(self, weights: str | os.PathLike | None = None, resize_inside: bool = False):
        super().__init__()
        with warnings.catch_warnings():        # the published weights are TorchScript; torch 2.x deprecates jit.load
            warnings.simplefilter("ignore", FutureWarning)
            self.base = torch.jit.load(str(inception_weights_path(weights)), map_location="cpu").eval()
        self.resize_inside = resize_inside

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        batch = images.shape[0]
        if self.resize_inside:
            return self.base(images, return_features=True).view(batch, FEATURE_DIM)
        if images.shape[-2:] != (299, 299):
            raise ValueError(f"clean-mode Inception expects 299x299 inputs, got {tuple(images.shape[-2:])}")
        return self.base.layers.forward((images - 128) / 128).view(batch, FEATURE_DIM)
