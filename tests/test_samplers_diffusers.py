"""fdistill's DPM-Solver++ against Diffusers' schedulers, same sigma list, starting noise and NFE, on the exact
Gaussian teacher of tests/test_samplers.py (closed-form ODE solution as the target)."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

from fdistill.samplers import sample, sigmas
from fdistill.samplers.reference import diffusers_sample

from test_samplers import SIGMA_MAX, SIGMA_MIN, exact_flow, gaussian_denoiser, start_noise

SOLVER_OF_ORDER = {2: "dpmpp_2m", 3: "dpmpp_3m"}


def errors(scheduler, schedule, x, order, solver=None, **options):
    target = exact_flow(x, schedule[0].item(), schedule[-1].item())
    ours = sample(gaussian_denoiser, x, schedule, solver or SOLVER_OF_ORDER[order], **options)
    theirs = diffusers_sample(scheduler, gaussian_denoiser, x, schedule)
    return (ours - target).abs().max().item(), (theirs - target).abs().max().item(), ours, theirs


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpmpp_2m_3m_equal_diffusers_edm(order, num_steps):
    schedule = sigmas("karras", num_steps, SIGMA_MIN, SIGMA_MAX)
    *_, ours, theirs = errors(EDMDPMSolverMultistepScheduler(solver_order=order), schedule, start_noise(), order)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_error_no_larger_than_diffusers_edm(order, num_steps):
    schedule = sigmas("logsnr", num_steps, SIGMA_MIN, SIGMA_MAX)
    ours, theirs, *_ = errors(EDMDPMSolverMultistepScheduler(solver_order=order), schedule, start_noise(), order)
    assert ours <= theirs * (1 + 1e-9), (ours, theirs)
    if order == 3:      # on the smooth Gaussian with log-SNR steps the full-Taylor 3M is clearly ahead
        scheduler = EDMDPMSolverMultistepScheduler(solver_order=3)
        taylor, *_ = errors(scheduler, schedule, start_noise(), 3, "dpmpp_3m_taylor")
        assert taylor < 0.7 * theirs, (taylor, theirs)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_error_no_larger_than_diffusers_vp_dpmsolver(order, num_steps):
    """DPMSolverMultistepScheduler (SD-style scaled-linear betas, epsilon): its own sigma list, VP inputs."""
    scheduler = DPMSolverMultistepScheduler(solver_order=order, beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012)
    scheduler.set_timesteps(num_steps)
    schedule = scheduler.sigmas.double()
    x = start_noise() * (schedule[0].item() / SIGMA_MAX)
    ours, theirs, *_ = errors(scheduler, schedule, x, order)
    assert ours <= theirs * (1 + 1e-5), (ours, theirs)     # Diffusers upcasts only to float32 inside step


def test_diffusers_3m_is_second_order_taylor_3m_third_order():
    """The reference multistep 3rd-order update halves the second divided difference (as ``dpmpp_3m`` does)."""
    x = start_noise()
    steps = [32, 64, 128]
    ours, theirs = [], []
    for n in steps:
        scheduler = EDMDPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min",
                                                   lower_order_final=False)
        schedule = sigmas("logsnr", n, SIGMA_MIN, SIGMA_MAX, append_zero=False)
        error_ours, error_theirs, *_ = errors(scheduler, schedule, x, 3, "dpmpp_3m_taylor", lower_order_final=False)
        ours.append(error_ours)
        theirs.append(error_theirs)
    slope = {name: -np.polyfit(np.log(steps), np.log(e), 1)[0] for name, e in (("ours", ours), ("theirs", theirs))}
    assert slope["ours"] >= 2.8 and 1.7 <= slope["theirs"] <= 2.3, slope
