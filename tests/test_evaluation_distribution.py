"""Distribution-level distances for point data against closed forms."""
import math

import pytest
import torch

from fdistill.evaluation.distribution import (
    mode_histogram, mode_precision, mode_total_variation, random_directions, sliced_wasserstein_1, wasserstein_1d,
)


def test_wasserstein_1d_matches_hand_computed_values_for_equal_and_unequal_sizes():
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    assert wasserstein_1d(x, x + 1).item() == pytest.approx(1.0)           # a shift by 1 moves every point by 1
    # {0} against {0, 2}: half the mass moves by 2
    one, two = torch.tensor([[0.0]]).double(), torch.tensor([[0.0, 2.0]]).double()
    assert wasserstein_1d(one, two).item() == pytest.approx(1.0)
    # {0, 0, 0, 4} against {1}: 3/4 * 1 + 1/4 * 3; rows are independent
    y = torch.tensor([[0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert wasserstein_1d(y, torch.tensor([[1.0], [1.0]]).double()).tolist() == pytest.approx([1.5, 0.0])


def test_sliced_wasserstein_of_a_translated_set_is_the_mean_absolute_projected_shift():
    """SW1(P, P + v) = E_theta |theta . v| = 2 |v| / pi in 2-D (uniform directions on the circle)."""
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.6, -0.8], dtype=torch.float64)                 # |v| = 1
    exact_for_the_drawn_directions = (random_directions(256, 2) @ shift).abs().mean().item()
    assert sliced_wasserstein_1(points, points + shift) == pytest.approx(exact_for_the_drawn_directions, rel=1e-9)
    assert sliced_wasserstein_1(points, points + shift) == pytest.approx(2 / math.pi, rel=0.05)
    assert sliced_wasserstein_1(points, points + shift, num_projections=5_000) == pytest.approx(2 / math.pi, rel=0.02)


def test_sliced_wasserstein_between_gaussians_with_different_scales():
    """Between N(0, I) and N(0, s^2 I) every projection is N(0, 1) vs N(0, s^2):
    W1 = |s - 1| E|Z| = |s - 1| sqrt(2 / pi)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, 2, generator=generator, dtype=torch.float64)
    y = 2.0 * torch.randn(10_000, 2, generator=generator, dtype=torch.float64)
    assert sliced_wasserstein_1(x, y) == pytest.approx(math.sqrt(2 / math.pi), rel=0.05)


def test_sliced_wasserstein_is_zero_on_identical_sets_deterministic_and_symmetric():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2))
    y = torch.randn(200, 3, generator=torch.Generator().manual_seed(3)) + 0.5
    assert sliced_wasserstein_1(x, x) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein_1(x, y) == sliced_wasserstein_1(x, y)
    assert sliced_wasserstein_1(x, y) == pytest.approx(sliced_wasserstein_1(y, x), rel=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein_1(x, y[:, :2])


def test_mode_metrics_on_constructed_samples():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    weights = torch.tensor([0.75, 0.25])
    stds = torch.tensor([0.1, 0.2])
    # 2 samples at mode 0, 2 at mode 1 (one 0.5 away: 2.5 std of mode 1, one 1.0 away: 5 std)
    samples = torch.tensor([[0.0, 0.0], [0.1, 0.0], [4.5, 0.0], [4.0, 1.0]])
    assert mode_histogram(samples, means).tolist() == [0.5, 0.5]
    assert mode_total_variation(samples, means, weights) == pytest.approx(0.25)
    assert mode_precision(samples, means, stds) == pytest.approx(0.75)
    assert mode_total_variation(samples[:2], means, torch.tensor([1.0, 0.0])) == pytest.approx(0.0)
