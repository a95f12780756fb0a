"""clean-fid's Inception-v3 (the TorchScript port of TF's ``inception-2015-12-05``), with verified weights.

Weights are looked up, in order:

1. the ``weights`` argument (``--inception-weights``), then the environment variable ``FDISTILL_INCEPTION_WEIGHTS``:
   a file chosen knowingly, used even when its SHA-256 differs from the published file's (the note says so);
2. fdistill's cache (``~/.cache/fdistill/inception-2015-12-05.pt``): it must have the published SHA-256, else an
   error says so (delete it, or pass it knowingly as in 1);
3. clean-fid's download location (``$TMPDIR/inception-2015-12-05.pt``, a world-writable folder): only copied into the
   cache when the copy has the published SHA-256, never loaded in place;
4. a download from ``INCEPTION_URL`` into the cache, verified before it is renamed into place.

Offline with no file -> ``FileNotFoundError`` saying exactly how to provide it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from ..hashing import file_sha256

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
# SHA-256 of the file at INCEPTION_URL, as k-diffusion pins it (k_diffusion/evaluation.py) for the same URL.
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
WEIGHTS_ENV = "FDISTILL_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """fdistill's cache folder: ``$FDISTILL_CACHE`` or ``~/.cache/fdistill``."""
    return Path(os.environ.get("FDISTILL_CACHE", Path.home() / ".cache" / "fdistill"))


def _install(stream: BinaryIO, destination: Path, sha256: str | None, origin: str) -> Path:
    """Copy ``stream`` to ``destination`` atomically (temporary file, then rename); with ``sha256``, only when the
    copied bytes have that hash (else the copy is removed and a ValueError names ``origin``)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as partial:
        try:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
                partial.write(chunk)
        except BaseException:
            Path(partial.name).unlink(missing_ok=True)
            raise
    if sha256 is not None and digest.hexdigest() != sha256:
        Path(partial.name).unlink()
        raise ValueError(f"{origin}: SHA-256 {digest.hexdigest()} is not the published {sha256}")
    os.replace(partial.name, destination)
    return destination


def download(url: str, destination: Path, timeout: float = 60.0, sha256: str | None = None) -> Path:
    """Download ``url`` to ``destination`` atomically; with ``sha256``, only a file with that hash is kept."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return _install(response, destination, sha256, url)


@dataclass(frozen=True)
class InceptionWeights:
    """The weights file used and its SHA-256; ``verified`` when it is the published file."""
    path: Path
    sha256: str

    @property
    def verified(self) -> bool:
        return self.sha256 == INCEPTION_SHA256

    def describe(self) -> str:
        if self.verified:
            return f"{self.path} (SHA-256 verified: the published {INCEPTION_FILENAME})"
        return (f"{self.path} (SHA-256 {self.sha256} is NOT the published {INCEPTION_SHA256}; used because it was "
                "given explicitly)")


def _explicit_weights(weights: str | os.PathLike | None) -> InceptionWeights | None:
    explicit = weights or os.environ.get(WEIGHTS_ENV)
    if not explicit:
        return None
    if not Path(explicit).is_file():
        source = "the weights argument" if weights else f"${WEIGHTS_ENV}"
        raise FileNotFoundError(f"Inception weights file {explicit} (from {source}) does not exist")
    return InceptionWeights(Path(explicit), file_sha256(explicit))


def inception_weights(weights: str | os.PathLike | None = None, allow_download: bool = True) -> InceptionWeights:
    """The Inception weights file to use and its hash (see module docstring for the search order and checks)."""
    if (chosen := _explicit_weights(weights)) is not None:
        return chosen
    cached, shared = cache_dir() / INCEPTION_FILENAME, Path(tempfile.gettempdir()) / INCEPTION_FILENAME
    if cached.is_file():
        digest = file_sha256(cached)
        if digest != INCEPTION_SHA256:
            raise ValueError(f"{cached}: SHA-256 {digest} is not the published {INCEPTION_SHA256} of "
                             f"{INCEPTION_FILENAME}; delete the file to download it again, or pass "
                             f"--inception-weights {cached} to use it knowingly")
        return InceptionWeights(cached, digest)
    reasons = []
    if shared.is_file():
        try:
            with open(shared, "rb") as stream:
                return InceptionWeights(_install(stream, cached, INCEPTION_SHA256, str(shared)), INCEPTION_SHA256)
        except ValueError as error:                               # someone else's file: never used
            reasons.append(f"ignored {error}")
    if allow_download:
        try:
            return InceptionWeights(download(INCEPTION_URL, cached, sha256=INCEPTION_SHA256), INCEPTION_SHA256)
        except OSError as error:                                  # URLError, timeouts, DNS failures are OSErrors
            reasons.append(f"download failed ({error})")
    else:
        reasons.append("downloads disabled")
    raise FileNotFoundError(
        f"Inception weights {INCEPTION_FILENAME} not found and {'; '.join(reasons)}. Provide the file in one of these "
        f"ways: pass --inception-weights PATH (Python: weights=PATH), set the environment variable {WEIGHTS_ENV}=PATH,"
        f" or download {INCEPTION_URL} to {cached} (SHA-256 {INCEPTION_SHA256})")


class InceptionFeatures(nn.Module):
    """Inception pool3 features [B, 2048] of images [B, 3, H, W] in [0, 255] (float), as clean-fid computes them.

    ``resize_inside=False`` (clean mode): inputs are already 299x299, normalised as (x - 128) / 128 and run through
    the network's layers. ``resize_inside=True`` (legacy_tensorflow): the TorchScript model resizes internally.
    """

    def __init__(self, weights: str | os.PathLike | None = None, resize_inside: bool = False):
        super().__init__()
        self.weights = inception_weights(weights)
        with warnings.catch_warnings():        # the published weights are TorchScript; torch 2.x deprecates jit.load
            warnings.simplefilter("ignore", FutureWarning)
            self.base = torch.jit.load(str(self.weights.path), map_location="cpu").eval()
        self.resize_inside = resize_inside

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        batch = images.shape[0]
        if self.resize_inside:
            return self.base(images, return_features=True).view(batch, FEATURE_DIM)
        if images.shape[-2:] != (299, 299):
            raise ValueError(f"clean-mode Inception expects 299x299 inputs, got {tuple(images.shape[-2:])}")
        return self.base.layers.forward((images - 128) / 128).view(batch, FEATURE_DIM)
