"""The 2-D benchmark / notebook functions: exact mode metrics, and a short run that learns the ring."""
import torch

from fdistill.benchmarks.fdistill_2d import ring_mode_metrics, train_2d


def test_mode_metrics_are_exact_on_constructed_samples():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # 6 points at mode 0, 4 at mode 1 (one of them 5 std away), none at mode 2
    samples = torch.tensor([[0.0, 0.0]] * 6 + [[10.0, 0.0]] * 3 + [[10.5, 0.0]])
    metrics = ring_mode_metrics(samples, means, weights, std=0.1)
    assert metrics["histogram"] == [0.6, 0.4, 0.0]
    assert metrics["modes_covered"] == 2
    assert abs(metrics["tv"] - 0.2) < 1e-12
    assert abs(metrics["precision"] - 0.9) < 1e-12


def test_short_2d_distillation_moves_samples_onto_the_ring():
    method, metrics = train_2d("js", seed=0, steps=60, batch_size=128, num_eval=1000)
    radius = method.generate(1000, torch.Generator().manual_seed(0)).norm(dim=1)
    # the generator starts at the origin (zero-initialised output layer); after 60 steps it reaches the ring
    assert 1.0 < float(radius.median()) < 3.0
    assert metrics["modes_covered"] >= 2
