"""The analytic teachers against brute-force posterior means."""
import math

import torch

from fdistill.denoisers import EmpiricalDenoiser, GaussianMixtureDenoiser


def brute_force_posterior_mean_gmm(gmm, x, sigma, num=400_000):
    """Monte-Carlo-free brute force: weight many prior samples by the likelihood N(x; x0, sigma^2)."""
    gen = torch.Generator().manual_seed(1)
    x0 = gmm.sample(num, generator=gen).double()
    log_lik = -0.5 * ((x[:, None, :] - x0[None]) ** 2).sum(-1) / sigma ** 2
    return (log_lik.softmax(1) @ x0)


def test_gaussian_mixture_matches_importance_weighted_prior_samples():
    gmm = GaussianMixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]]),
                                  torch.tensor([[0.3, 0.6], [0.5, 0.2], [0.4, 0.4]]), torch.tensor([0.2, 0.5, 0.3]))
    x = torch.tensor([[0.0, 0.0], [1.5, 1.2], [-1.0, -2.0]], dtype=torch.float64)
    sigma = 0.8
    exact = gmm(x, torch.full((3,), sigma, dtype=torch.float64))
    brute = brute_force_posterior_mean_gmm(gmm, x, sigma)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, brute, atol=2e-2, rtol=0)


def test_gaussian_mixture_single_component_is_linear_shrinkage():
    mean, std, sigma = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.5, 1.0, 2.0]]), 1.5
    gmm = GaussianMixtureDenoiser(mean, std)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = mean + std ** 2 / (std ** 2 + sigma ** 2) * (x - mean)
    torch.testing.assert_close(gmm(x, sigma), expected.double())


def test_gaussian_mixture_log_density_integrates_to_one_in_1d():
    gmm = GaussianMixtureDenoiser(torch.tensor([[-1.0], [2.0]]), torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7]))
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    density = gmm.log_density(grid, 0.5).exp()
    assert abs(torch.trapezoid(density, grid[:, 0]).item() - 1.0) < 1e-6


def test_empirical_denoiser_chunked_equals_one_shot_softmax():
    data = torch.randn(257, 3, 4, 4)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0, 80.0], dtype=torch.float64)
    flat = data.reshape(257, -1).double()
    sq_dist = ((x.reshape(6, 1, -1) - flat[None]) ** 2).sum(-1)
    expected = ((-sq_dist / (2 * sigma[:, None] ** 2)).softmax(1) @ flat).reshape(x.shape)
    for chunk in (1000, 64, 7):
        torch.testing.assert_close(EmpiricalDenoiser(data, chunk_size=chunk)(x, sigma), expected)


def test_empirical_denoiser_class_conditional_only_uses_that_class():
    data = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])
    labels = torch.tensor([0] * 5 + [1] * 5)
    den = EmpiricalDenoiser(data, labels=labels, chunk_size=3)
    out = den(torch.full((2, 2), 0.5), torch.tensor([1.0, 1.0]), cond=torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def test_empirical_denoiser_tiny_sigma_snaps_to_nearest_point():
    data = torch.randn(50, 8)
    x = data[:3] + 1e-3 * torch.randn(3, 8)
    torch.testing.assert_close(EmpiricalDenoiser(data)(x, 1e-2), data[:3], atol=1e-5, rtol=0)
    assert math.isfinite(EmpiricalDenoiser(data)(x * 100, 1e-3).abs().max().item())
