"""UniPC (fdistill.samplers.unipc) against closed-form answers and Diffusers' UniPCMultistepScheduler, on the exact
Gaussian teacher of tests/test_samplers.py."""
import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from fdistill.samplers import nfe, sample, sigmas
from fdistill.samplers.reference import diffusers_sample
from fdistill.samplers.unipc import phi, unipc_step_orders, unipc_update, unipc_weights

from test_samplers import SIGMA_MAX, SIGMA_MIN, exact_flow, gaussian_denoiser, start_noise


def denoise(x, sigma):
    return gaussian_denoiser(x, torch.full((len(x),), sigma, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [False, True])
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_local_error_order_of_one_step_from_the_exact_trajectory(variant, order, corrector, prediction):
    """Zhao et al. 2023, Sec. 3: from exact history, UniP-p errs by O(h^{p+1}) in one step and UniC-p,
    with the network evaluated at the predicted point, by O(h^{p+2})."""
    x_start = start_noise()
    trajectory = lambda sigma: exact_flow(x_start, SIGMA_MAX, sigma)       # noqa: E731

    def model(x, sigma):
        return denoise(x, sigma) if prediction == "data" else (x - denoise(x, sigma)) / sigma

    errors, step_sizes = [], [0.2, 0.1, 0.05]
    for h in step_sizes:
        sigma_s, sigma_t = 1.0, math.exp(-h)
        past_sigmas = [sigma_s * math.exp(k * h) for k in reversed(range(order))]       # oldest first
        history = [(sigma, model(trajectory(sigma), sigma)) for sigma in past_sigmas]
        x_t = unipc_update(trajectory(sigma_s), sigma_s, sigma_t, history, variant, prediction=prediction)
        if corrector:
            x_t = unipc_update(trajectory(sigma_s), sigma_s, sigma_t, history, variant, model(x_t, sigma_t),
                               prediction)
        errors.append((x_t - trajectory(sigma_t)).abs().max().item())
    slope = np.polyfit(np.log(step_sizes), np.log(errors), 1)[0]
    expected = order + 1 + corrector
    assert expected - 0.2 <= slope <= expected + 0.3, (slope, errors)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_global_convergence_order_on_exact_gaussian_flow(variant, order):
    """Over the whole flow (80 -> 0.002, log-SNR steps): order p without the corrector, about p + 1 with it (the
    first, warm-up steps of lower order keep p = 3 slightly below 4 at these step counts)."""
    x = start_noise()
    target = exact_flow(x, SIGMA_MAX, SIGMA_MIN)
    steps = [16, 32, 64]
    slopes, finest = {}, {}
    for corrector in (False, True):
        errors = [(sample(gaussian_denoiser, x, sigmas("logsnr", n, SIGMA_MIN, SIGMA_MAX, append_zero=False),
                          f"unipc_{variant}", order=order, corrector=corrector, lower_order_final=False)
                   - target).abs().max().item() for n in steps]
        slopes[corrector] = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        finest[corrector] = errors[-1]
    assert slopes[False] >= order - 0.2 and slopes[True] >= order + 1 - 0.35, slopes
    assert finest[True] < finest[False], finest


def diffusers_cases():
    """Diffusers returns NaN on a step into sigma = 0 with bh1 (B(h) = -h is infinite) and with noise prediction
    (sigma_t (e^h - 1) is 0 * inf); those cases end at sigma_min."""
    for prediction in ("data", "noise"):
        for variant in ("bh1", "bh2"):
            for end in ("zero", "sigma_min"):
                if end == "sigma_min" or (variant == "bh2" and prediction == "data"):
                    yield from ((prediction, variant, end, order) for order in (1, 2, 3))


@pytest.mark.parametrize("prediction, variant, end, order", list(diffusers_cases()))
@pytest.mark.parametrize("num_steps", [6, 15])
def test_equals_diffusers_unipc_scheduler(prediction, variant, end, order, num_steps):
    """Same sigma list (Karras, set into the scheduler), same starting noise and model; the VP scheduler sees
    x / sqrt(1 + sigma^2) and epsilon = (x - D) / sigma (fdistill.samplers.reference). Diffusers counts a step into
    sigma = 0 in its lower-order-final rule, as fdistill does from 8 steps on (the zero-end lists have 8 and 15)."""
    if end == "zero":
        num_steps = max(num_steps, 8)
    schedule = sigmas("karras", num_steps, SIGMA_MIN, SIGMA_MAX, append_zero=end == "zero")
    x = start_noise()
    scheduler = UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type=end,
                                        predict_x0=prediction == "data")
    theirs = diffusers_sample(scheduler, gaussian_denoiser, x, schedule)
    solver = f"unipc_{variant}" + ("_noise" if prediction == "noise" else "")
    ours = sample(gaussian_denoiser, x, schedule, solver, order=order)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lower_order_final, disable_corrector", [(False, ()), (True, (0, 3, 4))])
def test_equals_diffusers_options(lower_order_final, disable_corrector):
    schedule = sigmas("logsnr", 8, SIGMA_MIN, SIGMA_MAX, append_zero=False)
    x = start_noise()
    scheduler = UniPCMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min",
                                        lower_order_final=lower_order_final, disable_corrector=list(disable_corrector))
    theirs = diffusers_sample(scheduler, gaussian_denoiser, x, schedule)
    ours = sample(gaussian_denoiser, x, schedule, "unipc_bh2", lower_order_final=lower_order_final,
                  disable_corrector=disable_corrector)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    if disable_corrector:     # the option is not a no-op
        corrected = sample(gaussian_denoiser, x, schedule, "unipc_bh2", lower_order_final=lower_order_final)
        assert (corrected - ours).abs().max() > 1e-3


@pytest.mark.parametrize("variant, order", [("bh1", 2), ("bh2", 3)])
def test_short_list_to_zero_equals_diffusers_run_to_sigma_min_then_denoise(variant, order):
    """Below 8 steps the final denoise is not counted by lower_order_final: N steps to sigma = 0 are Diffusers' run
    over the N positive sigmas (its last step into sigma_min first order) followed by D(x, sigma_min)."""
    schedule = sigmas("karras", 4, SIGMA_MIN, SIGMA_MAX)
    x = start_noise()
    scheduler = UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type="sigma_min")
    at_sigma_min = diffusers_sample(scheduler, gaussian_denoiser, x, schedule[:-1])
    theirs = gaussian_denoiser(at_sigma_min, torch.full((len(x),), SIGMA_MIN, dtype=torch.float64))
    ours = sample(gaussian_denoiser, x, schedule, f"unipc_{variant}", order=order)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_unip2_bh2_is_dpmpp_2m():
    """With one divided difference weighted 1/2 and B(h) = e^{-h} - 1, UniP-2 is DPM-Solver++(2M) (module docstring)."""
    schedule = sigmas("karras", 20, SIGMA_MIN, SIGMA_MAX)
    x = start_noise()
    unip = sample(gaussian_denoiser, x, schedule, "unipc_bh2", order=2, corrector=False)
    torch.testing.assert_close(unip, sample(gaussian_denoiser, x, schedule, "dpmpp_2m"), rtol=0, atol=1e-12)


def test_unip3_bh2_is_the_full_taylor_dpmpp_3m():
    """With two divided differences the weights solve R w = g exactly, so B(h) w does not depend on B and UniP-3
    integrates the same quadratic through the last three x0's as dpmpp_3m_taylor; with bh2 the warm-up step
    (UniP-2) is 2M as well (bh1's is not)."""
    schedule = sigmas("karras", 20, SIGMA_MIN, SIGMA_MAX)
    x = start_noise()
    unip = sample(gaussian_denoiser, x, schedule, "unipc_bh2", corrector=False, lower_order_final=False)
    taylor = sample(gaussian_denoiser, x, schedule, "dpmpp_3m_taylor", lower_order_final=False)
    torch.testing.assert_close(unip, taylor, rtol=0, atol=1e-12)


def test_final_corrector_costs_one_evaluation_and_helps_a_large_last_step():
    assert nfe("unipc_bh2", 10) == 10 and nfe("unipc_bh1", 10, to_zero=False) == 10     # the corrector is free
    assert nfe("unipc_bh2", 10, final_corrector=True) == 11
    assert nfe("unipc_bh2", 10, to_zero=False, final_corrector=True) == 11
    schedule = sigmas("logsnr", 10, 0.5, SIGMA_MAX, append_zero=False)      # last step 0.70 -> 0.5, h = 0.35
    x = start_noise()
    target = exact_flow(x, SIGMA_MAX, 0.5)
    error = {final: (sample(gaussian_denoiser, x, schedule, "unipc_bh2", final_corrector=final) - target).abs().max()
             for final in (False, True)}
    assert error[True] < error[False] / 2, error


def test_phi_series_and_recurrence_agree_and_weights_solve_order_conditions():
    for k in range(5):
        for z in (-0.999, -1.001, -3.0):     # series just inside |z| < 1, recurrence just outside
            closed = (math.exp(z) - sum(z ** j / math.factorial(j) for j in range(k))) / z ** k
            assert math.isclose(phi(k, z), closed, rel_tol=1e-12), (k, z)
    h, nodes = 0.4, [-0.7, -1.5, 1.0]
    scale, weights = unipc_weights(-h, nodes, "bh1")
    for n in range(1, 4):
        expected = -h * phi(n + 1, -h) * math.factorial(n) / scale
        assert math.isclose(sum(w * r ** (n - 1) for w, r in zip(weights, nodes)), expected, rel_tol=1e-12)
    assert unipc_weights(-h, [1.0], "bh2") == (math.expm1(-h), [0.5])


def test_step_orders_lower_order_final_is_unipc_rule_at_any_step_count():
    schedule = sigmas("logsnr", 20, SIGMA_MIN, SIGMA_MAX, append_zero=False).tolist()
    assert unipc_step_orders(schedule, 3, True)[-3:] == [3, 2, 1]
    assert unipc_step_orders(schedule, 3, False)[-3:] == [3, 3, 3]
    assert unipc_step_orders(schedule[:4] + [0.0], 3, True) == [1, 2, 1, 0]         # < 8 steps: denoise not counted
    assert unipc_step_orders(schedule[:7] + [0.0], 3, True)[-3:] == [2, 1, 0]
    assert unipc_step_orders(schedule[:8] + [0.0], 3, True)[-3:] == [3, 2, 0]        # >= 8 steps: it counts


@pytest.mark.parametrize("options, message", [({"variant": "bh3"}, "allowed: bh1, bh2"), ({"order": 4}, "order"),
                                              ({"prediction": "v"}, "allowed: data, noise")])
def test_bad_options_are_named(options, message):
    from fdistill.samplers import unipc
    with pytest.raises(ValueError, match=message):
        unipc(gaussian_denoiser, start_noise(), sigmas("karras", 3), **options)


@pytest.mark.parametrize("solver", ["unipc_bh2", "unipc_bh1_noise", "dpmpp_3m_taylor"])
def test_methods_periodic_sampling_uses_the_new_solvers(solver):
    """A training method's ``generate`` (sample grids, periodic evaluation) goes through the same registry."""
    from fdistill.data import digits
    from fdistill.methods.denoising import DenoisingConfig, build
    from fdistill.networks import tiny_unet
    from fdistill.training.config import SamplerConfig

    torch.manual_seed(0)
    config = DenoisingConfig(sampler=SamplerConfig(solver=solver, steps=4))
    images = build(config, tiny_unet(channels=1, resolution=8, num_classes=10), digits(split="test")).generate(
        3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

