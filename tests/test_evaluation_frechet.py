"""Frechet distance (exact Gaussian answers, clean-fid's sqrtm value) and streaming feature statistics."""
import warnings

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

from fdistill.evaluation import FeatureStats, fid_from_stats, frechet_distance, load_statistics, trace_sqrt_product


def random_covariance(rng, dim, rank=None):
    factor = rng.standard_normal((dim, rank or dim + 10))
    return factor @ factor.T / factor.shape[1]


def test_trace_sqrt_matches_closed_form_for_non_commuting_covariances_at_d2048():
    # S2 = M S1 M with M PSD: S1 S2 = (S1 M)^2 and S1 M has non-negative eigenvalues, so tr (S1 S2)^(1/2) = tr(S1 M).
    rng = np.random.default_rng(0)
    sigma1, m = random_covariance(rng, 2048), random_covariance(rng, 2048)
    exact = np.trace(sigma1 @ m)
    assert trace_sqrt_product(sigma1, m @ sigma1 @ m) == pytest.approx(exact, rel=1e-9)


def test_frechet_distance_equals_cleanfid_sqrtm_value():
    rng = np.random.default_rng(1)
    dim = 256
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_covariance(rng, dim), 1.3 * random_covariance(rng, dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)          # sqrtm(disp=) is deprecated in SciPy 1.17
        reference = cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-6)


def test_diagonal_gaussians_closed_form_and_singular_covariance():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, -2.0])
    exact = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)           # ||dmu||^2 + ||sqrt(a) - sqrt(b)||^2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(exact, rel=1e-12)  # singular S1


def test_identical_sets_give_zero_and_shifted_set_gives_squared_shift():
    features = torch.randn(3000, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    shift = torch.linspace(-1, 1, 32, dtype=torch.float64)
    same = fid_from_stats(FeatureStats().update(features), FeatureStats().update(features))
    shifted = fid_from_stats(FeatureStats().update(features), FeatureStats().update(features + shift))
    assert abs(same) < 1e-8
    assert shifted == pytest.approx(float(shift.square().sum()), rel=1e-8)


def test_chunked_statistics_equal_one_shot_and_state_size_is_constant():
    features = torch.randn(1000, 16)
    one_shot = FeatureStats().update(features)
    chunked, sizes = FeatureStats(), []
    for chunk in features.split(37):
        chunked.update(chunk)
        sizes.append(sum(t.numel() for t in chunked.state_tensors()))
    merged = FeatureStats().update(features[:400]).merge(FeatureStats().update(features[400:]))
    reference = features.double().numpy()
    for stats in (one_shot, chunked, merged):
        assert stats.num == 1000
        np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stats.cov, np.cov(reference, rowvar=False), rtol=0, atol=1e-12)
    assert len(set(sizes)) == 1 and sizes[0] == 1 + 16 + 16 * 16
    restored = FeatureStats.from_state(*chunked.state_tensors())
    np.testing.assert_array_equal(restored.cov, chunked.cov)


def test_statistics_round_trip_and_errors(tmp_path):
    stats = FeatureStats().update(torch.randn(50, 4))
    stats.save(tmp_path / "s.npz")
    mu, sigma = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, stats.mean) and np.testing.assert_array_equal(sigma, stats.cov)
    with pytest.raises(ValueError, match="feature dimension 3 != accumulator dimension 4"):
        stats.update(torch.randn(2, 3))
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(ValueError, match="lacks keys"):
        load_statistics(tmp_path / "bad.npz")
