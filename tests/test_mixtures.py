"""The random-mixture family of the benchmarks and its mode metrics."""
import pytest
import torch

from fdistill.benchmarks.mixtures import mode_metrics, random_mixture
from fdistill.data import gaussian_mixture


@pytest.mark.parametrize("dim", [2, 8])
def test_random_mixture_properties(dim):
    for seed in range(20):
        m = random_mixture(seed, dim)
        weights, means, stds = m["weights"], m["means"], m["stds"]
        assert 3 <= len(weights) <= 8 and means.shape == (len(weights), dim) and stds.shape == (len(weights),)
        assert float(weights.sum()) == pytest.approx(1.0)
        assert 30 - 1e-9 <= float(weights.max() / weights.min()) <= 60 + 1e-9
        assert float(weights.min()) >= 0.01 - 1e-12
        gaps = torch.cdist(means, means) + torch.eye(len(means)) * 1e9
        assert float(gaps.min()) >= 8 * float(stds.max())          # 4-std balls never overlap
        assert ((stds >= 0.05 - 1e-12) & (stds <= 0.15 + 1e-12)).all()


def test_random_mixture_is_deterministic_and_varies_with_seed():
    a, b, c = random_mixture(3, 2), random_mixture(3, 2), random_mixture(4, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(a["weights"]) != len(c["weights"]) or not torch.equal(a["means"], c["means"])


def test_random_mixture_builds_data_and_teacher():
    data = gaussian_mixture(**random_mixture(0, 8), num_samples=100)
    assert data.sample_shape == (8,) and len(data.extras["denoiser"].weights) == 5


def test_mode_metrics_on_constructed_samples():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    stds = torch.tensor([0.1, 0.1, 0.2], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # 60 at mode 0 (10 of them 0.5 away: beyond 4 std), 40 at mode 1 (0.3 away), none at mode 2
    samples = torch.cat([torch.zeros(50, 2), torch.tensor([[0.5, 0.0]]).repeat(10, 1),
                         torch.tensor([[10.3, 0.0]]).repeat(40, 1)])
    m = mode_metrics(samples, means, stds, weights)
    assert m["histogram"] == pytest.approx([0.6, 0.4, 0.0])
    assert m["modes_covered"] == 2 and m["num_modes"] == 3
    assert m["tv"] == pytest.approx(0.2)
    assert m["precision"] == pytest.approx(0.9)
    # a mode at exactly 25 % of its share counts as covered, below it does not
    m = mode_metrics(torch.cat([torch.zeros(95, 2), torch.full((5, 2), 10.0) * torch.tensor([0.0, 1.0])]),
                     means, stds, weights)
    assert m["modes_covered"] == 2                              # mode 2: 0.05 = 0.25 x 0.2; mode 1: 0 < 0.075
