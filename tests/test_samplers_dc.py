"""DC-Solver (fdistill/samplers/dc_solver.py): reduction to UniPC, the compensation's interpolation, the ratio
search's gain on an exact Gaussian flow, and the cascade polynomial regression."""
import math

import numpy as np
import pytest
import torch

from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.samplers import (CascadeRegression, dc_solver, nfe, reference_trajectory, sample, search_ratios,
                               sigmas)
from fdistill.samplers.dc_solver import compensate, lagrange_weights

DIM = 8
MEAN = torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)[None]
STD = torch.logspace(math.log10(0.05), math.log10(1.5), DIM, dtype=torch.float64)[None]
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6


@pytest.fixture(autouse=True)
def _one_thread():
    """[<= 64, 8] tensors: a second thread only adds synchronisation (30x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian():
    return GaussianMixtureDenoiser(MEAN, STD)


def exact_final(noise: torch.Tensor) -> torch.Tensor:
    """x0 = D(x(sigma_min), sigma_min) with the closed-form flow (x - m) / sqrt(s^2 + sigma^2) = const."""
    shrink = torch.sqrt(STD ** 2 + SIGMA_MIN ** 2) / torch.sqrt(STD ** 2 + SIGMA_MAX ** 2)
    x = MEAN + (noise - MEAN) * shrink
    return gaussian()(x, torch.full((x.shape[0],), SIGMA_MIN, dtype=x.dtype))


def starts(seed: int, batch: int = 32) -> torch.Tensor:
    return SIGMA_MAX * torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("options", [dict(), dict(variant="bh1", order=2), dict(order=3, lower_order_final=False)])
def test_unit_ratios_are_unipc(options):
    noise, schedule = starts(0), sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX)
    unipc_name = f"unipc_{options.get('variant', 'bh2')}"
    unipc_options = {k: v for k, v in options.items() if k != "variant"}
    expected = sample(gaussian(), noise, schedule, unipc_name, **unipc_options)
    got = sample(gaussian(), noise, schedule, "dc_solver", ratios=[1.0] * 8, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert nfe("dc_solver", 8) == 8


def test_ratios_change_the_result_after_the_warm_up_only():
    noise, schedule = starts(0), sigmas("karras", 6, SIGMA_MIN, SIGMA_MAX)
    base = sample(gaussian(), noise, schedule, "dc_solver")
    warm_up_only = sample(gaussian(), noise, schedule, "dc_solver", ratios=[0.5, 0.7, 1, 1, 1, 1])
    torch.testing.assert_close(warm_up_only, base, rtol=0, atol=1e-12)     # dc_order = 2: steps 0, 1 untouched
    shifted = sample(gaussian(), noise, schedule, "dc_solver", ratios=[1, 1, 0.9, 1, 1, 1])
    assert (shifted - base).abs().max() > 1e-4


def test_compensation_interpolates_in_log_sigma():
    # x0 quadratic in lambda = -log sigma: the Lagrange interpolation through 3 nodes is exact at any ratio
    sigma_values = [4.0, 1.5, 0.5]
    value = lambda lam: torch.tensor([[1.0 + 2 * lam - 0.5 * lam ** 2]], dtype=torch.float64)
    history = [(s, value(-math.log(s))) for s in sigma_values]
    for ratio in (0.0, 0.6, 1.0, 1.4):
        target = ratio * -math.log(0.5) + (1 - ratio) * -math.log(1.5)
        torch.testing.assert_close(compensate(history, ratio), value(target), rtol=0, atol=1e-12)
    assert lagrange_weights([0.0, 1.0, 3.0], 3.0) == pytest.approx([0.0, 0.0, 1.0])


@pytest.mark.parametrize("kind", ["karras", "logsnr"])
def test_searched_ratios_beat_unipc_on_held_out_starts(kind):
    """Ratios searched on 16 trajectories cut the error of UniPC bh2 on 64 other starts at 5 and 8 NFE
    (measured in the benchmark: Karras sigmas, 8 NFE, 0.26 -> 0.08)."""
    train, test = starts(1, 16), starts(2, 64)
    truth = exact_final(test)
    for steps in (5, 8):
        schedule = sigmas(kind, steps, SIGMA_MIN, SIGMA_MAX)
        ratios = search_ratios(gaussian(), train, schedule, reference_trajectory(gaussian(), train, schedule))
        assert ratios[:2] == [1.0, 1.0] and any(r != 1.0 for r in ratios)
        error = lambda out: (out - truth).norm(dim=1).median().item()
        unipc = error(sample(gaussian(), test, schedule, "unipc_bh2"))
        dc = error(sample(gaussian(), test, schedule, "dc_solver", ratios=ratios))
        assert dc < 0.7 * unipc, (steps, dc, unipc)


def test_reference_trajectory_matches_the_closed_form():
    noise, schedule = starts(3, 8), sigmas("karras", 5, SIGMA_MIN, SIGMA_MAX)
    states = reference_trajectory(gaussian(), noise, schedule)
    assert len(states) == 5
    torch.testing.assert_close(states[-1], exact_final(noise), rtol=0, atol=1e-5)


def test_cascade_regression_recovers_a_polynomial_law():
    law = lambda i, n: 1.0 + 0.3 * (i / n) - 0.2 * (i / n) ** 2 * (1 + n / 50)
    searched = {n: [1.0, 1.0] + [law(i, n) for i in range(2, n)] for n in (5, 8, 12, 20)}
    cpr = CascadeRegression.fit(searched)
    assert cpr.coefficients.shape == (3, 3)
    for n in (6, 10, 30):                                             # step counts not fitted
        assert cpr.ratios(n) == pytest.approx([1.0, 1.0] + [law(i, n) for i in range(2, n)], abs=1e-9)
    noise, schedule = starts(0, 4), sigmas("karras", 10, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(sample(gaussian(), noise, schedule, "dc_solver", cpr=cpr),
                               sample(gaussian(), noise, schedule, "dc_solver", ratios=cpr.ratios(10)))


def test_cascade_regression_rejects_too_few_points():
    with pytest.raises(ValueError, match="step counts"):
        CascadeRegression.fit({5: [1.0] * 5, 8: [1.0] * 8})
    with pytest.raises(ValueError, match="3 steps leave 1 ratios"):
        CascadeRegression.fit({3: [1.0] * 3, 8: [1.0] * 8, 10: [1.0] * 10})
    steep = np.array([[1.0, 0.0, 400.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])       # rho = 1 + 400 (N / 50)^2
    assert CascadeRegression(steep).ratios(4) == [1.0, 1.0, 2.0, 2.0]              # clipped to the search bracket


def test_bad_options_are_named():
    noise, schedule = starts(0, 2), sigmas("karras", 4, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="3 ratios for 4 steps"):
        sample(gaussian(), noise, schedule, "dc_solver", ratios=[1.0] * 3)
    with pytest.raises(ValueError, match="dc_order must be 1 or 2"):
        sample(gaussian(), noise, schedule, "dc_solver", dc_order=3)
    with pytest.raises(ValueError, match="unknown variant 'bh3'"):
        sample(gaussian(), noise, schedule, "dc_solver", variant="bh3")
