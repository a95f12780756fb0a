"""Random Gaussian mixtures from a seed, and mode metrics of samples against a mixture (the random-mixture
benchmarks of f-distill and DDO: ``scripts/bench_fdistill_mixtures.py``).

A mixture is a dict with ``means`` [K, D], ``stds`` [K] and ``weights`` [K] (float64 tensors), so
``fdistill.data.gaussian_mixture(**random_mixture(seed, dim))`` builds its data and exact teacher.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fdistill.evaluation.distribution import mode_histogram, mode_precision

COVERED_SHARE = 0.25        # a mode is covered when it holds >= 25 % of its true share of the samples
PRECISION_STDS = 4.0        # a sample is precise when it lies within 4 of its nearest mode's stds of that mode


def _weights(generator: torch.Generator, num_modes: int, span: float, min_weight: float) -> Tensor:
    """[K] weights, max / min = ``span`` exactly, min >= ``min_weight``: the lightest is 1, the heaviest ``span``,
    the others span ** (alpha u_i) with u_i uniform in [0, 1); alpha = 1, or when the lightest share 1 / sum would
    fall below min_weight, the largest alpha in [0, 1] (bisection) that keeps it >= min_weight."""
    u = torch.rand(num_modes - 2, generator=generator, dtype=torch.float64)

    def total(alpha: float) -> float:
        return 1.0 + span + float((span ** (alpha * u)).sum())

    alpha, low, high = 1.0, 0.0, 1.0
    if 1.0 / total(1.0) < min_weight:
        for _ in range(60):
            alpha = (low + high) / 2
            low, high = (alpha, high) if 1.0 / total(alpha) >= min_weight else (low, alpha)
        alpha = low
    raw = torch.cat([torch.tensor([1.0, span], dtype=torch.float64), span ** (alpha * u)])
    order = torch.randperm(num_modes, generator=generator)          # the heavy mode is not always first
    return (raw / raw.sum())[order]


def _means(generator: torch.Generator, num_modes: int, dim: int, box: float, min_separation: float) -> Tensor:
    """[K, D] means uniform in [-box, box]^D, every pair at least ``min_separation`` apart (rejection sampling)."""
    means: list[Tensor] = []
    for _ in range(10000):
        candidate = (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1) * box
        if all(float((candidate - m).norm()) >= min_separation for m in means):
            means.append(candidate)
            if len(means) == num_modes:
                return torch.stack(means)
    raise ValueError(f"cannot place {num_modes} modes {min_separation} apart in [-{box}, {box}]^{dim}")


def random_mixture(seed: int, dim: int, min_modes: int = 3, max_modes: int = 8, span: tuple[float, float] = (30.0, 60.0),
                   min_weight: float = 0.01, std_range: tuple[float, float] = (0.05, 0.15), box: float = 2.0,
                   min_separation: float = 1.2) -> dict[str, Tensor]:
    """A random isotropic Gaussian mixture, a deterministic function of (seed, dim, settings).

    K uniform in [min_modes, max_modes]; weights with max / min uniform in ``span`` and lightest >= ``min_weight``
    (in random order); means uniform in [-box, box]^dim, pairwise >= ``min_separation`` apart (8 of the widest std
    at the defaults, so 4-std balls never overlap); stds log-uniform in ``std_range``.
    Returns {"means": [K, dim], "stds": [K], "weights": [K]} (float64; weights sum to 1).
    """
    if not (2 <= min_modes <= max_modes and dim >= 1 and 1 < span[0] <= span[1] and 0 < min_weight * max_modes < 1
            and 0 < std_range[0] <= std_range[1]):
        raise ValueError(f"random_mixture: invalid settings dim={dim}, modes=[{min_modes}, {max_modes}], span={span}, "
                         f"min_weight={min_weight}, std_range={std_range}")
    generator = torch.Generator().manual_seed(int(seed))
    num_modes = int(torch.randint(min_modes, max_modes + 1, (1,), generator=generator))
    ratio = span[0] + (span[1] - span[0]) * float(torch.rand(1, generator=generator, dtype=torch.float64))
    weights = _weights(generator, num_modes, ratio, min_weight)
    means = _means(generator, num_modes, dim, box, min_separation)
    log_stds = torch.empty(num_modes, dtype=torch.float64).uniform_(math.log(std_range[0]), math.log(std_range[1]),
                                                                     generator=generator)
    return {"means": means, "stds": log_stds.exp(), "weights": weights}


def mode_metrics(samples: Tensor, means: Tensor, stds: Tensor, weights: Tensor, covered_share: float = COVERED_SHARE,
                 precision_stds: float = PRECISION_STDS) -> dict:
    """Mode metrics of ``samples`` [N, D] against a mixture (means [K, D], stds [K], weights [K]), from
    ``fdistill.evaluation.distribution``'s nearest-mode histogram.

    Returns: modes_covered (modes whose nearest-mode share >= ``covered_share`` x true weight), num_modes,
    tv (total variation 0.5 sum |share - weight| of the nearest-mode histogram), precision (share of samples within
    ``precision_stds`` of their nearest mode's std of it), histogram (the [K] shares, a list).
    """
    share = mode_histogram(samples, means)
    weights = weights.double()
    return {"modes_covered": int((share >= covered_share * weights).sum()), "num_modes": len(means),
            "tv": float(0.5 * (share - weights).abs().sum()),
            "precision": mode_precision(samples, means, stds, precision_stds), "histogram": share.tolist()}
