"""DDO losses: invariants at theta = ref, gradient isolation, and the estimator against exact Gaussian answers."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.losses.ddo import ddo_log_ratio, ddo_log_ratio_from_outputs, ddo_loss
from fdistill.losses.denoising import edm_weight as edm_loss_weight


class GaussianDenoiser(nn.Module):
    """Differentiable exact denoiser of N(mean, diag(std^2)): D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean = nn.Parameter(torch.as_tensor(mean, dtype=torch.float64))
        self.log_std = nn.Parameter(torch.as_tensor(std, dtype=torch.float64).log())

    def forward(self, x, sigma, cond=None):
        var = (2 * self.log_std).exp()
        shrink = var / (var + sigma[:, None] ** 2)
        return self.mean + shrink * (x - self.mean)

    def expected_error(self, x, sigma):
        """E_eps ||D(x + sigma eps, sigma) - x||^2 in closed form, x: [D], sigma: [S] -> [S]."""
        var = (2 * self.log_std).exp().detach()
        k = var / (var + sigma[:, None] ** 2)
        return ((1 - k) ** 2 * (x - self.mean.detach()) ** 2 + k ** 2 * sigma[:, None] ** 2).sum(1)

    def log_density(self, x):
        std = self.log_std.exp().detach()
        return torch.distributions.Normal(self.mean.detach(), std).log_prob(x).sum(-1)


class DropoutMLP(nn.Module):
    """A denoiser with dropout, to check that the estimate runs it in eval mode."""

    def __init__(self, dim=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.SiLU(), nn.Dropout(0.5), nn.Linear(32, dim))

    def forward(self, x, sigma, cond=None):
        return self.net(torch.cat([x, sigma[:, None].log()], 1))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 6.0])
def test_identical_networks_give_zero_ratio_and_1_plus_alpha_log2(alpha):
    model = DropoutMLP().train()
    reference = copy.deepcopy(model).train()
    x = torch.randn(16, 4)
    ratio_real = ddo_log_ratio(model, reference, x, num_draws=3)
    ratio_fake = ddo_log_ratio(model, reference, torch.randn(16, 4))
    # zero up to rounding: the reference runs without grad, which may pick other CPU kernels than the model's pass
    torch.testing.assert_close(ratio_real, torch.zeros(16), rtol=0, atol=1e-4)
    torch.testing.assert_close(ratio_fake, torch.zeros(16), rtol=0, atol=1e-4)
    loss = ddo_loss(ratio_real, ratio_fake, alpha=alpha, beta=0.05)
    assert loss.item() == pytest.approx((1 + alpha) * math.log(2), abs=2e-5)
    assert model.training and reference.training          # flags restored after the eval-mode estimate


def test_gradient_reaches_model_only_and_points_towards_data():
    model, reference = GaussianDenoiser([0.0, 0.0], [1.0, 1.0]), GaussianDenoiser([0.0, 0.0], [1.0, 1.0])
    real = torch.randn(512, 2, dtype=torch.float64) * torch.tensor([1.0, 0.3]) + torch.tensor([1.0, 0.0])
    fake = torch.randn(512, 2, dtype=torch.float64)                   # samples of the reference N(0, 1)
    g = torch.Generator().manual_seed(0)
    loss = ddo_loss(ddo_log_ratio(model, reference, real, num_draws=8, generator=g),
                    ddo_log_ratio(model, reference, fake, num_draws=8, generator=g), alpha=1.0, beta=0.05)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert model.mean.grad[0] < 0                 # descending moves the mean of dim 0 towards the data's +1
    assert model.log_std.grad[1] > 0              # and shrinks the std of dim 1 towards the data's 0.3


def test_core_is_a_weighted_sum_not_a_mean():
    x, x0_model, x0_ref = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5), torch.ones(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 2.0])
    delta = ddo_log_ratio_from_outputs(x, x0_model, x0_ref, sigma, sigma_data=0.5)
    expected = edm_loss_weight(sigma, 0.5) * 4 * (1.0 - 0.25)
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(edm_loss_weight(torch.tensor([0.5]), 0.5), torch.tensor([8.0]))


def _log_sigma_grid(lo, hi, n=4001):
    log_sigma = torch.linspace(lo, hi, n, dtype=torch.float64)
    return log_sigma, log_sigma.exp()


def test_estimator_mean_equals_quadrature_of_the_edm_weighted_gap():
    """E[Delta] = int N(ln s; P_mean, P_std) lambda(s) E_eps[gap(s)] d ln s, closed-form E_eps for Gaussians."""
    model = GaussianDenoiser([0.3, -0.2], [0.6, 1.1])
    reference = GaussianDenoiser([0.0, 0.1], [0.8, 0.9])
    x = torch.tensor([0.5, -0.4], dtype=torch.float64)
    num = 200_000
    estimate = ddo_log_ratio(model, reference, x.expand(num, 2), generator=torch.Generator().manual_seed(3)).detach()
    log_sigma, sigma = _log_sigma_grid(-0.4 - 10, -0.4 + 10)
    density = torch.exp(-0.5 * (log_sigma + 0.4) ** 2) / math.sqrt(2 * math.pi)
    gap = reference.expected_error(x, sigma) - model.expected_error(x, sigma)
    exact = torch.trapezoid(density * edm_loss_weight(sigma, 0.5) * gap, log_sigma).item()
    standard_error = estimate.std().item() / math.sqrt(num)
    assert abs(estimate.mean().item() - exact) < 4 * standard_error
    # The EDM weighting is NOT the likelihood weighting: the true log ratio is a different number here.
    true_ratio = (model.log_density(x) - reference.log_density(x)).item()
    assert abs(exact - true_ratio) > 10 * standard_error


def _hermite_expectation(fn, num_nodes=80):
    """E_{eps ~ N(0, 1)} fn(eps) by Gauss-Hermite quadrature (probabilists' weight)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = torch.as_tensor(weights / math.sqrt(2 * math.pi))
    return sum(w * fn(float(e)) for e, w in zip(nodes, weights))


def test_likelihood_weighting_of_the_same_gap_is_the_exact_log_ratio():
    """int sigma^-3 E_eps[gap] dsigma = log p_theta(x) - log p_ref(x) for exact denoisers (continuous-time ELBO
    with zero gap), checked on two 1-D Gaussian mixtures through the library's core function."""
    model = GaussianMixtureDenoiser(torch.tensor([[-1.0], [1.5]]), torch.tensor([0.5, 0.7]), torch.tensor([0.3, 0.7]))
    reference = GaussianMixtureDenoiser(torch.tensor([[-0.5], [1.0]]), torch.tensor([0.8, 0.4]))
    x = torch.tensor([[0.2], [1.3], [-1.1]], dtype=torch.float64)
    log_sigma, sigma = _log_sigma_grid(-9.0, 9.0, 3001)
    xs, sig = x.repeat_interleave(len(sigma), 0), sigma.repeat(len(x))

    def weighted_gap(eps):
        x_noisy = xs + sig[:, None] * eps
        delta = ddo_log_ratio_from_outputs(xs, model(x_noisy, sig), reference(x_noisy, sig), sig)
        return delta / edm_loss_weight(sig, 0.5) * sig ** -2       # sigma^-3 dsigma = sigma^-2 d ln sigma

    integrand = _hermite_expectation(weighted_gap).reshape(len(x), len(sigma))
    integral = torch.trapezoid(integrand, log_sigma, dim=1)
    zeros = torch.zeros(len(x), dtype=torch.float64)
    true_ratio = model.log_density(x, zeros) - reference.log_density(x, zeros)
    torch.testing.assert_close(integral, true_ratio, atol=2e-4, rtol=0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_draws"):
        ddo_log_ratio(DropoutMLP(), DropoutMLP(), torch.randn(2, 4), num_draws=0)
