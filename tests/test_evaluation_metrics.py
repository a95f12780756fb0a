"""KID (unbiased, brute-force check) and precision / recall (k-NN manifolds)."""
import itertools

import numpy as np
import pytest
import torch

from fdistill.evaluation import kernel_inception_distance, mmd2_unbiased, precision_recall


def brute_force_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_brute_force_formula():
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x, y), rel=1e-12)


def test_kid_is_unbiased_near_zero_for_same_distribution_and_positive_for_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 16, generator=generator), torch.randn(1000, 16, generator=generator)
    mean, std = kernel_inception_distance(a, b, num_subsets=20, subset_size=250)
    shifted, _ = kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=250)
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-4 and std > 0
    assert shifted > 20 * std
    assert kernel_inception_distance(a, b, 5, 100, seed=3) == kernel_inception_distance(a, b, 5, 100, seed=3)


def test_precision_recall_of_identical_and_disjoint_and_mode_dropping_sets():
    real = torch.randn(400, 2, dtype=torch.float64)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    half = real[real[:, 0] > 0]                    # a generator that covers only half of the data
    precision, recall = precision_recall(real, half)
    assert precision == 1.0 and 0.3 < recall < 0.7
