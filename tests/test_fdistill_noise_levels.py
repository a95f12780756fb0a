"""f-distill's noise levels and fake-score loss weighting for Stable Diffusion (VP) teachers, as the official recipes
(FastGen's SD1.5 / SDXL f-distill, DMD2) draw and weight them."""
import math

import pytest
import torch

from fdistill.data.base import DataSource, TensorDictDataset
from fdistill.denoisers import DiffusersDenoiser, GaussianMixtureDenoiser
from fdistill.losses.denoising import (karras_uniform_sigmas, loguniform_sigmas, time_uniform_sigmas,
                                       truncated_lognormal_sigmas)
from fdistill.methods.base import StepContext
from fdistill.losses.denoising import LOSS_WEIGHTS
from fdistill.methods.fdistill import FDistill, FDistillConfig, PixelDomain
from fdistill.networks import MLPDenoiser
from fdistill.tiny_sd import tiny_sd_components

T_MIN, T_MAX = 0.001, 0.999


def sd_sigma_table() -> torch.Tensor:
    """[1000] sigmas of Stable Diffusion's training timesteps (scaled-linear betas 0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def ks_distance_to_uniform(t: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of t and U[low, high]."""
    t = t.double().sort().values
    cdf = ((t - low) / (high - low)).clamp(0, 1)
    n = len(t)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def timesteps_of(sigmas: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The integer timestep of each sigma, which must be a member of the table (to float32 precision)."""
    index = (table.log()[None, :] - sigmas.double().log()[:, None]).abs().argmin(1)
    torch.testing.assert_close(table[index], sigmas.double(), rtol=1e-6, atol=0)
    return index


def test_time_uniform_draws_are_uniform_in_t_on_the_training_timesteps():
    table = sd_sigma_table()
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    index = timesteps_of(time_uniform_sigmas(u, table, T_MIN, T_MAX), table)
    assert int(index.min()) == 1 and int(index.max()) == 998                 # floor(1000 t), t in [0.001, 0.999]
    # t of the drawn timestep is uniform (to the 1/1000 grid): KS 5 % critical value 1.36 / sqrt(n) ~= 0.0068
    assert ks_distance_to_uniform((index + 0.5) / 1000, T_MIN, T_MAX) < 0.0068 + 0.001
    # the karras distribution on the same sigma range is far from uniform in t (what the recipes drew before)
    lo, hi = float(table[1]) ** (1 / 7), float(table[998]) ** (1 / 7)
    karras_t = (torch.searchsorted(table, (lo + u.double() * (hi - lo)) ** 7) + 0.5) / 1000
    assert ks_distance_to_uniform(karras_t, T_MIN, T_MAX) > 0.15
    # monotone in the quantile u (the ratio bins bin u)
    ordered = time_uniform_sigmas(torch.linspace(0, 0.9999, 1001), table, T_MIN, T_MAX)
    assert bool((ordered[1:] >= ordered[:-1]).all())


def test_the_method_draws_time_uniform_sigmas_of_its_sd_teacher():
    components = tiny_sd_components("sd15", image_size=8)
    teacher = DiffusersDenoiser(components.unet, components.scheduler)
    config = FDistillConfig(sigma_distribution="time_uniform", t_min=0.2, t_max=0.6, gan_weight=0.0, divergence="rkl")
    method = FDistill(config, teacher, MLPDenoiser(2), MLPDenoiser(2), PixelDomain((2,)))
    u = torch.rand(4000, generator=torch.Generator().manual_seed(1))
    index = timesteps_of(method.sample_sigma(u), teacher.train_sigmas)
    assert int(index.min()) == 200 and int(index.max()) == 599
    assert ks_distance_to_uniform((index + 0.5) / 1000, 0.2, 0.6) < 1.36 / math.sqrt(4000) + 0.0025
    assert "teacher_sigmas" not in method.state_dict()                       # derived from the teacher, not state
    analytic = GaussianMixtureDenoiser(torch.zeros(1, 2), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="time_uniform needs a teacher with discrete VP timesteps"):
        FDistill(config, analytic, MLPDenoiser(2), MLPDenoiser(2), PixelDomain((2,)))
    with pytest.raises(ValueError, match="method.t_min / t_max"):
        FDistillConfig(t_min=0.5, t_max=0.5)


def test_each_fake_score_weighting_equals_its_loss():
    """lambda(sigma) * ||x0_hat - x0||^2 is the EDM loss, the unweighted x0 loss (FastGen SD1.5) and exactly the
    unweighted epsilon loss ||eps_hat - eps||^2 (FastGen SDXL, DMD2) of an epsilon model x0_hat = x_t - sigma eps_hat."""
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.03, 0.1, 0.5, 1.0, 4.0, 14.6])
    x_t = x0 + sigma[:, None, None, None] * eps
    x0_hat = x_t - sigma[:, None, None, None] * eps_hat
    x0_mse = (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(LOSS_WEIGHTS["epsilon"](sigma, 0.5) * x0_mse,
                               (eps_hat - eps).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(LOSS_WEIGHTS["x0"](sigma, 0.5) * x0_mse, x0_mse)
    torch.testing.assert_close(LOSS_WEIGHTS["edm"](sigma, 0.5), (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2)


@pytest.mark.parametrize("weighting", ["edm", "x0", "epsilon"])
def test_the_critic_phase_uses_the_configured_weighting(weighting):
    teacher = GaussianMixtureDenoiser(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.3, 0.4]),
                                      torch.tensor([0.5, 0.5]))
    config = FDistillConfig(divergence="rkl", gan_weight=0.0, fake_score_weighting=weighting, sigma_distribution="loguniform",
                            sigma_min=0.05, sigma_max=5.0)
    method = FDistill(config, teacher, MLPDenoiser(2), MLPDenoiser(2), PixelDomain((2,)))
    data = DataSource(TensorDictDataset(x=torch.randn(8, 2)), (2,))
    torch.manual_seed(0)
    item = method.prepare_step("critic", [next(data.loader(8))], StepContext(step=0))[0]
    _, logs = method.loss("critic", item, StepContext(step=0))
    with torch.no_grad():
        x = method.generated(item)
        x_t = x + item.sigma[:, None] * item.eps
        mse = (method.networks["fake_score"](x_t, item.sigma) - x).pow(2).mean(1)
    expected = {"edm": (item.sigma ** 2 + 0.25) / (0.5 * item.sigma) ** 2, "x0": 1.0,
                "epsilon": item.sigma ** -2}[weighting]
    assert logs["critic/fake_score"] == pytest.approx(float((expected * mse).mean()), rel=1e-5)


def test_quantile_samplers_are_the_inverse_cdfs_of_their_distributions():
    """sigma(u) for u on a grid: each sampler's CDF, written out here, maps sigma back to u."""
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    sigma = truncated_lognormal_sigmas(u, -1.2, 1.2, 0.02, 80.0)
    normal = torch.distributions.Normal(torch.tensor(-1.2, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64))
    lo, hi = (normal.cdf(torch.tensor(math.log(s), dtype=torch.float64)) for s in (0.02, 80.0))
    torch.testing.assert_close((normal.cdf(sigma.log()) - lo) / (hi - lo), u)
    assert float(sigma.min()) > 0.02 and float(sigma.max()) < 80.0
    torch.testing.assert_close(loguniform_sigmas(u, 0.05, 3.0).log(), math.log(0.05) + u * math.log(3.0 / 0.05))
    root = karras_uniform_sigmas(u, 0.002, 80.0, 7.0) ** (1 / 7)
    torch.testing.assert_close((root - 0.002 ** (1 / 7)) / (80.0 ** (1 / 7) - 0.002 ** (1 / 7)), u)
