"""f-distill losses: exact formulas (h(r) = f''(r) r^2 by autograd, DMD2 gradient by hand, GAN optimum)."""
import math

import pytest
import torch

from fdistill.losses.fdistill import (DIVERGENCES, binned_sums, density_ratio, discriminator_loss, dmd_gradient,
                                      f_divergence_weight, fdistill_generator_loss, generator_gan_loss, noise_level_bins)
from fdistill.losses.denoising import weighted_denoising_loss

# The generator functions f of each divergence (convex, f(1) = 0 up to affine terms, which do not change f'').
GENERATORS = {
    "rkl": lambda r: -torch.log(r),
    "kl": lambda r: r * torch.log(r),
    "js": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),
    "sf": lambda r: (1 + r) * torch.log(1 + r) - r * torch.log(r) - torch.log(r),
    "sh": lambda r: (torch.sqrt(r) - 1) ** 2,
    "jf": lambda r: (r - 1) * torch.log(r),
    "neyman": lambda r: (1 - r) ** 2 / r,
}


def second_derivative(f, r):
    r = r.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), r)
    return second


@pytest.mark.parametrize("name", DIVERGENCES)
def test_weight_is_f_second_derivative_times_r_squared_up_to_a_constant(name):
    r = torch.tensor([0.1, 0.3, 1.0, 2.5, 7.0, 20.0], dtype=torch.float64)
    h = f_divergence_weight(r, name)
    reference = second_derivative(GENERATORS[name], r) * r ** 2
    ratio = h / reference
    assert h.shape == r.shape
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-10)
    assert ratio[0] > 0


def test_rkl_weight_is_per_sample_and_unknown_name_lists_all_seven():
    h = f_divergence_weight(torch.rand(5) + 0.5, "rkl")
    assert h.shape == (5,) and torch.equal(h, torch.ones(5))
    with pytest.raises(ValueError) as error:
        f_divergence_weight(torch.ones(2), "tv")
    for name in ("rkl", "kl", "js", "sf", "sh", "jf", "neyman"):
        assert name in str(error.value)


def test_density_ratio_clamps_and_detaches():
    logit = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0], requires_grad=True)
    r = density_ratio(logit)
    assert not r.requires_grad
    expected = torch.tensor([0.1, math.exp(-1.0), 1.0, math.exp(2.0), 20.0])
    assert torch.allclose(r, expected)
    assert torch.allclose(density_ratio(torch.tensor([12.0]), logit_clamp=1.0, ratio_max=100.0), torch.tensor([math.e]))


def test_bins_by_quantile_are_equally_populated_and_sums_are_exact():
    quantile = (torch.arange(1000) + 0.5) / 1000
    bins = noise_level_bins(quantile, 10)
    assert torch.equal(torch.bincount(bins, minlength=10), torch.full((10,), 100))
    assert noise_level_bins(torch.tensor([0.0, 0.0999, 0.1, 1.0]), 10).tolist() == [0, 0, 1, 9]
    sums, counts = binned_sums(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 2, 0]), 3)
    assert sums.tolist() == [5.0, 0.0, 2.0] and counts.tolist() == [2.0, 0.0, 1.0]


def test_generator_loss_gradient_is_dmd2_gradient_times_weight():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    x0_fake, x0_teacher = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    weight = torch.tensor([1.0, 0.5, 2.0, 0.5])
    loss = fdistill_generator_loss(x, x0_fake, x0_teacher, weight).mean()
    loss.backward()
    # by hand: DMD2's g = (x0_fake - x0_teacher) / mean|x - x0_teacher| per sample; d/dx of the element mean = g / numel
    by_hand = torch.stack([(x0_fake[i] - x0_teacher[i]) / ((x[i] - x0_teacher[i]).abs().mean() + 1e-8) for i in range(4)])
    expected = weight.view(4, 1, 1, 1) * by_hand / (4 * 12)
    assert torch.allclose(x.grad, expected, atol=1e-7)
    assert torch.allclose(dmd_gradient(x, x0_fake, x0_teacher), by_hand)
    # the loss value is 0.5 * |h g|^2 / numel per sample
    assert torch.allclose(loss, 0.5 * (weight.view(4, 1, 1, 1) * by_hand).pow(2).mean(dim=(1, 2, 3)).mean())


def test_discriminator_optimum_is_the_log_density_ratio():
    p, q = torch.tensor([0.7, 0.2, 0.05]), torch.tensor([0.1, 0.3, 0.6])
    logit = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([logit], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # population loss: E_p softplus(-l) + E_q softplus(l), pointwise over the 3 states
        loss = (p * discriminator_loss(logit, torch.full_like(logit, -1e9)) + q * torch.nn.functional.softplus(logit)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.allclose(logit.detach(), (p / q).log(), atol=1e-4)
    assert torch.allclose(generator_gan_loss(torch.tensor([0.0])), torch.tensor([math.log(2.0)]))


def test_fake_score_loss_is_the_weighted_element_mean():
    """The fake score's loss (losses.denoising): lambda(sigma) * mean over elements of (D - x0)^2, per sample."""
    x0_pred, x0 = torch.ones(2, 4), torch.zeros(2, 4)
    x0_pred[1] *= 2
    sigma = torch.tensor([0.5, 2.0])
    assert weighted_denoising_loss(x0_pred, x0, sigma, "x0").tolist() == [1.0, 4.0]
    assert weighted_denoising_loss(x0_pred, x0, sigma, "epsilon").tolist() == [4.0, 1.0]      # sigma^-2
