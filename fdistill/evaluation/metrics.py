"""Feature-set metrics beyond FID: KID and improved precision / recall.

- KID (Binkowski et al. 2018, Sec. 3 / Eq. 4): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x . y / d + 1)^3, averaged over seeded random subsets (mean and std over subsets).
- Precision / recall (Kynkaanniemi et al. 2019, Eqs. 1-3): the manifold of a set is the union of balls around its
  points with radius = distance to the k-th nearest neighbour (k = 3); precision = fraction of generated samples
  inside the real manifold, recall = fraction of real samples inside the generated manifold.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / d + 1)^3 for x [n, d], y [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 estimate (Gretton et al. 2012, Eq. 3) with the cubic kernel; x [m, d], y [n, d], m, n >= 2."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased MMD^2 over ``num_subsets`` random subsets (without replacement) of size
    min(subset_size, n1, n2) from each set; features [n, d] (torch or numpy), computed in float64.
    """
    x = torch.as_tensor(np.asarray(features1), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(features2), dtype=torch.float64)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                            y[rng.choice(y.shape[0], size, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def knn_radii(features: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """[n] distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k = {k} samples, got {features.shape[0]}")
    return torch.cat([torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(chunk)])


def manifold_coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """Fraction of ``queries`` [n, d] inside some ball (support_j, radii_j) of ``support`` [m, d]."""
    inside = [(torch.cdist(block, support) <= radii[None]).any(1) for block in queries.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features, generated_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated vs real features [n, d]."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(generated_features), dtype=torch.float64)
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall
