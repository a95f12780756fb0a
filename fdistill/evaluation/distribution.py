"""Distribution-level distances for low-dimensional point data (Gaussian mixtures, toy data): lower is better.

A two-moment Frechet distance on a mixture only compares means and covariances: a single wide Gaussian with the
mixture's mean and covariance scores 0. These distances see the modes:

- sliced Wasserstein-1 (Rabin et al. 2011; Bonneel et al. 2015, Eq. 5 with p = 1):
  SW1(P, Q) = E_theta W1(theta#P, theta#Q) over directions theta uniform on the unit sphere, estimated with
  ``num_projections`` directions drawn from a fixed seed, so repeated calls on the same sets give the same number.
  Each 1-D W1 is exact for empirical sets of any sizes: W1 = integral |F(t) - G(t)| dt (Vallender 1974).
- mode total variation: nearest-mode histogram of the samples against the mixture's weights,
  TV = 0.5 * sum_k |h_k - w_k| (in [0, 1]).
- precision: share of samples within ``radius_stds`` standard deviations of their nearest mode.
"""
from __future__ import annotations

import torch
from torch import Tensor

SLICED_WASSERSTEIN_PROJECTIONS = 256     # directions; the Monte Carlo error of SW1 is ~ std(W1 over theta) / 16
SLICED_WASSERSTEIN_SEED = 0


def random_directions(num: int, dim: int, seed: int = SLICED_WASSERSTEIN_SEED) -> Tensor:
    """[num, dim] float64 unit vectors, uniform on the sphere (normalised standard normals), from ``seed``."""
    directions = torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def wasserstein_1d(x: Tensor, y: Tensor) -> Tensor:
    """Exact W1 between the empirical measures of each row: x [P, n], y [P, m] -> [P].

    W1 = integral |F_x(t) - F_y(t)| dt: sort the pooled values of each row; between consecutive pooled values the
    CDF difference is the running sum of +1/n (a point of x) and -1/m (a point of y).
    """
    n, m = x.shape[1], y.shape[1]
    values, order = torch.cat([x, y], dim=1).sort(dim=1)
    steps = torch.cat([torch.full((n,), 1.0 / n, dtype=values.dtype), torch.full((m,), -1.0 / m, dtype=values.dtype)])
    cdf_difference = steps[order].cumsum(1)[:, :-1]                                     # [P, n + m - 1]
    return (cdf_difference.abs() * values.diff(dim=1)).sum(1)


def sliced_wasserstein_1(x: Tensor, y: Tensor, num_projections: int = SLICED_WASSERSTEIN_PROJECTIONS,
                         seed: int = SLICED_WASSERSTEIN_SEED) -> float:
    """Sliced Wasserstein-1 distance between point sets x [n, D] and y [m, D] (any sizes >= 1), in the data's units:
    the mean exact 1-D W1 over ``num_projections`` seeded random directions (module docstring)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein_1: point sets differ in dimension, {x.shape[1]} and {y.shape[1]}")
    directions = random_directions(num_projections, x.shape[1], seed)
    return float(wasserstein_1d(directions @ x.T, directions @ y.T).mean())


def nearest_mode(samples: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Index [N] of each sample's nearest mode (Euclidean) and its distance [N]; samples [N, D], means [K, D]."""
    distances = torch.cdist(samples.flatten(1).double(), means.double())
    distance, index = distances.min(1)
    return index, distance


def mode_histogram(samples: Tensor, means: Tensor) -> Tensor:
    """[K] share of the samples [N, D] whose nearest mode is k (sums to 1)."""
    index, _ = nearest_mode(samples, means)
    return torch.bincount(index, minlength=len(means)).double() / len(samples)


def mode_total_variation(samples: Tensor, means: Tensor, weights: Tensor) -> float:
    """Total variation 0.5 * sum_k |h_k - w_k| between the nearest-mode histogram of samples [N, D] and the mixture
    weights [K] (summing to 1): 0 when every mode holds exactly its share, 1 when all samples sit on weightless
    modes."""
    return float(0.5 * (mode_histogram(samples, means) - weights.double()).abs().sum())


def mode_precision(samples: Tensor, means: Tensor, stds: Tensor, radius_stds: float = 4.0) -> float:
    """Share of samples [N, D] within ``radius_stds`` * std of their nearest mode; stds [K] or per axis [K, D] (the
    largest axis counts)."""
    index, distance = nearest_mode(samples, means)
    widest = stds.double().reshape(len(means), -1).max(1).values
    return float((distance <= radius_stds * widest[index]).double().mean())
