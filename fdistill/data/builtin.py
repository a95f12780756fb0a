"""Built-in data that needs no download: sklearn's bundled 8x8 digits and Gaussian mixtures in any dimension."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers import GaussianMixtureDenoiser
from .base import DataSource, TensorDictDataset

SPLITS = ("all", "train", "test")
DIGITS_RESOLUTIONS = (8, 16, 32)


def split_indices(num_items: int, split: str, test_fraction: float, seed: int = 0) -> Tensor:
    """Indices of a fixed (seeded) train/test split; 'all' keeps the natural order."""
    if split not in SPLITS:
        raise ValueError(f"data split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if split == "all":
        return torch.arange(num_items)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    num_test = max(1, round(test_fraction * num_items))
    return order[:num_test] if split == "test" else order[num_test:]


def digits_images(resolution: int = 8) -> tuple[Tensor, Tensor]:
    """sklearn's 1,797 digits as [N, 1, R, R] float32 in [-1, 1] (pixel values [0, 16] mapped linearly) and [N] labels.
    Upsampling to 16 or 32 is bilinear (align_corners=False)."""
    from sklearn.datasets import load_digits

    if resolution not in DIGITS_RESOLUTIONS:
        raise ValueError(f"digits resolution must be one of {DIGITS_RESOLUTIONS}, got {resolution}")
    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return images, torch.as_tensor(raw.target, dtype=torch.long)


def digits(resolution: int = 8, labels: bool = True, split: str = "all", test_fraction: float = 0.1) -> DataSource:
    """The sklearn digits (10 classes, 1 channel), optionally resized and split (a fixed 90/10 split by default)."""
    images, targets = digits_images(resolution)
    keep = split_indices(len(images), split, test_fraction)
    tensors = {"x": images[keep]}
    if labels:
        tensors["label"] = targets[keep]
    return DataSource(TensorDictDataset(**tensors), (1, resolution, resolution), 10 if labels else 0,
                      name=f"digits{resolution}-{split}")


def ring_preset(dim: int = 2, num_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> dict[str, Tensor]:
    """A ring of ``num_modes`` modes with unequal weights (1, 2, ..., num_modes, normalised) in the first two axes."""
    if dim < 2:
        raise ValueError(f"the ring preset needs dim >= 2, got {dim}")
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = torch.zeros(num_modes, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
    weights = torch.arange(1, num_modes + 1, dtype=torch.float64)
    return {"means": means, "stds": torch.full((num_modes,), std, dtype=torch.float64), "weights": weights / weights.sum()}


def grid_preset(dim: int = 2, side: int = 5, spacing: float = 1.0, std: float = 0.05) -> dict[str, Tensor]:
    """side x side equal-weight modes on a square grid centred at 0 in the first two axes."""
    if dim < 2:
        raise ValueError(f"the grid preset needs dim >= 2, got {dim}")
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.zeros(side * side, dim, dtype=torch.float64)
    means[:, :2] = torch.cartesian_prod(coords, coords)
    return {"means": means, "stds": torch.full((side * side,), std, dtype=torch.float64), "weights": None}


GMM_PRESETS = {"ring8": ring_preset, "grid25": grid_preset}


def gaussian_mixture(means: list | None = None, stds: list | float | None = None, weights: list | None = None,
                     preset: str | None = None, dim: int = 2, num_samples: int = 20000, seed: int = 0,
                     class_labels: bool = False) -> DataSource:
    """A Gaussian mixture sum_k w_k N(mu_k, diag(s_k^2)) as a finite sample (``num_samples`` points, [N, D]) plus its
    exact denoiser in ``extras["denoiser"]`` (a GaussianMixtureDenoiser: an exact teacher).

    Either ``means`` ([K][D]) with ``stds`` (one float, [K] or [K][D]) and optional ``weights`` ([K]), or a ``preset``
    in GMM_PRESETS ('ring8': 8 modes on a circle with weights 1..8; 'grid25': 5x5 grid) in ``dim`` dimensions.
    With ``class_labels`` each component is its own class (``"label"`` = component index).
    """
    if preset is not None:
        if preset not in GMM_PRESETS:
            raise ValueError(f"data.preset must be one of {sorted(GMM_PRESETS)}, got {preset!r}")
        spec = GMM_PRESETS[preset](dim)
        means, stds, weights = spec["means"], spec["stds"], spec["weights"]
    if means is None or stds is None:
        raise ValueError("gaussian_mixture needs either a preset or both means and stds")
    means = torch.as_tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64)
    stds = stds.expand(len(means)) if stds.ndim == 0 else stds
    labels = torch.arange(len(means)) if class_labels else None
    denoiser = GaussianMixtureDenoiser(means, stds, None if weights is None else torch.as_tensor(weights), labels=labels)
    points, components = denoiser.sample(num_samples, torch.Generator().manual_seed(seed), return_components=True)
    tensors = {"x": points}
    if class_labels:
        tensors["label"] = components
    return DataSource(TensorDictDataset(**tensors), (means.shape[1],), len(means) if class_labels else 0,
                      name=f"gmm{len(means)}x{means.shape[1]}", extras={"denoiser": denoiser})

