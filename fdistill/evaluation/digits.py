"""Built-in digits feature network: "digits FD" and class histograms with no download.

A small CNN classifier trained on sklearn's bundled 8x8 digits (``scripts/train_digits_features.py``, deterministic,
seconds on CPU); weights ship in ``fdistill/assets/digits_features.safetensors`` with its training record (held-out
accuracy, data split) in ``digits_features.json``. Its 64-d penultimate activations play the role Inception's pool
features play for FID; its softmax gives the class of a generated digit (TV distance of class histograms).

Input convention: images in [-1, 1], [B, 1, 8, 8] (sklearn pixel p in 0..16 maps to p / 8 - 1). Larger or smaller
images are area-resampled to 8x8, RGB is averaged to gray, and flat [B, 64] vectors are reshaped.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frechet import FeatureStats, frechet_distance

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_PATH = ASSET_DIR / "digits_features.safetensors"
RECORD_PATH = ASSET_DIR / "digits_features.json"
NUM_CLASSES = 10
FEATURE_DIM = 64
IMAGE_SIZE = 8


def digits_images(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1,797 sklearn digits as ([N, 1, 8, 8] images in [-1, 1], [N] long labels); pixel p -> p / 8 - 1."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsFeatureNet(nn.Module):
    """CNN on 8x8 digits: two conv blocks -> 64-d features -> 10 logits.

    ``features(x)`` [B, 64] (the penultimate layer, before its ReLU, so no unit is identically zero);
    ``forward(x)`` [B, 10] logits. Inputs go through ``to_digit_grid`` first (any size / channel count).
    """

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                              # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                              # 4x4 -> 2x2
        )
        self.project = nn.Linear(2 * width * 4, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.project(self.conv(to_digit_grid(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))


def to_digit_grid(images: Tensor) -> Tensor:
    """[B, 64] or [B, C, H, W] in [-1, 1] -> [B, 1, 8, 8] float32 (channel mean, area resampling)."""
    images = torch.as_tensor(images)
    if images.ndim == 2 and images.shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        images = images.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    if images.ndim != 4:
        raise ValueError(f"digits images must be [B, C, H, W] or [B, 64], got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] != 1:
        images = images.mean(1, keepdim=True)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return images


@functools.lru_cache(maxsize=1)
def digits_feature_network() -> DigitsFeatureNet:
    """The shipped, frozen classifier (eval mode, CPU, float32); loaded once per process."""
    from safetensors.torch import load_file

    if not WEIGHTS_PATH.exists():
        raise FileNotFoundError(f"missing {WEIGHTS_PATH}: regenerate it with `python scripts/train_digits_features.py`")
    record = json.loads(RECORD_PATH.read_text()) if RECORD_PATH.exists() else {}
    network = DigitsFeatureNet(**record.get("architecture", {}))
    network.load_state_dict(load_file(str(WEIGHTS_PATH)))
    return network.eval().requires_grad_(False)


class DigitsFeatureExtractor(nn.Module):
    """``nn.Module`` mapping images [B, C, H, W] in [-1, 1] to digits features [B, 64] (for ``FeatureStats``)."""

    def __init__(self):
        super().__init__()
        # a copy: moving this extractor to a GPU must not move the shared CPU network that digits_fd uses
        self.network = copy.deepcopy(digits_feature_network())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.network.features(images.to(next(self.network.parameters()).device))


def digits_feature_extractor() -> DigitsFeatureExtractor:
    """The digits feature extractor: images [B, C, H, W] in [-1, 1] -> [B, 64] features."""
    return DigitsFeatureExtractor()


@torch.no_grad()
def _batched(function, images: Tensor, batch_size: int = 1024) -> Tensor:
    images = to_digit_grid(images.detach().cpu())
    return torch.cat([function(chunk) for chunk in images.split(batch_size)])


@functools.lru_cache(maxsize=1)
def digits_reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """(mu [64], sigma [64, 64]) float64 of the features of all 1,797 sklearn digits; computed once per process."""
    images, _ = digits_images()
    stats = FeatureStats().update(_batched(digits_feature_network().features, images))
    return stats.mean, stats.cov


def digits_fd(images: Tensor) -> float:
    """Frechet distance ("digits FD") between the features of ``images`` and those of the full digits dataset.

    Args: images [B, C, H, W] (or [B, 64]) in [-1, 1], B >= 2 (use >= 1,000 for a stable value; like FID it is
    biased upwards at small B). Returns a float >= ~0; the digits dataset itself scores 0.
    """
    stats = FeatureStats().update(_batched(digits_feature_network().features, images))
    mu_ref, sigma_ref = digits_reference_statistics()
    return frechet_distance(stats.mean, stats.cov, mu_ref, sigma_ref)


def digits_predict(images: Tensor) -> Tensor:
    """Predicted class [B] (long) of each image [B, C, H, W] in [-1, 1]."""
    return _batched(digits_feature_network(), images).argmax(1)


def digits_class_histogram(images: Tensor) -> Tensor:
    """Frequencies [10] (float64, sums to 1) of the predicted classes of ``images`` [B, C, H, W] in [-1, 1].

    TV distance to a target class distribution p: ``0.5 * (hist - p).abs().sum()``.
    """
    counts = torch.bincount(digits_predict(images), minlength=NUM_CLASSES).to(torch.float64)
    return counts / counts.sum().clamp_min(1)
