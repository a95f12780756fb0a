"""fdistill.samplers against closed-form answers: Gaussian data has an exact denoiser and an exact ODE flow,
(x - m) / sqrt(s^2 + sigma^2) is constant along the probability-flow ODE."""
import math

import numpy as np
import pytest
import torch

from fdistill.denoisers import ClassifierFreeGuidance, GaussianMixtureDenoiser
from fdistill.samplers import SOLVERS, CountingDenoiser, dpmpp_3m_coefficients, nfe, sample, sigmas, step_orders

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
MEAN = torch.tensor([[0.3, -1.0, 0.5, 2.0, -0.2, 0.0]], dtype=torch.float64)
STD = torch.tensor([[0.05, 0.1, 0.3, 0.7, 1.2, 2.0]], dtype=torch.float64)     # uneven: several time scales


def gaussian_denoiser(x, sigma, cond=None):
    """Exact E[x0 | x] for x0 ~ N(MEAN, diag(STD^2)), x = x0 + sigma * eps."""
    var = STD.to(x.dtype) ** 2
    return MEAN.to(x.dtype) + var / (var + sigma[:, None] ** 2) * (x - MEAN.to(x.dtype))


def exact_flow(x, sigma_from, sigma_to):
    """Closed-form probability-flow ODE solution of the Gaussian from sigma_from to sigma_to."""
    return MEAN + (x - MEAN) * torch.sqrt(STD ** 2 + sigma_to ** 2) / torch.sqrt(STD ** 2 + sigma_from ** 2)


def start_noise(batch=16, dtype=torch.float64):
    return (SIGMA_MAX * torch.randn(batch, MEAN.shape[1], generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64)).to(dtype)


EXPECTED_ORDER = {"euler": (0.8, 1.2), "dpm_solver_1": (0.8, 1.2), "heun": (1.8, 2.3), "dpm_solver_2": (1.8, 2.3),
                  "dpmpp_2s": (1.8, 2.3), "dpmpp_2m": (1.8, 2.3), "dpm_solver_3": (2.8, 5.0), "dpmpp_3m": (1.8, 2.7),
                  "dpmpp_3m_taylor": (2.8, 5.0)}


@pytest.mark.parametrize("solver", sorted(EXPECTED_ORDER))
def test_convergence_order_on_exact_gaussian_flow(solver):
    x = start_noise()
    target = exact_flow(x, SIGMA_MAX, SIGMA_MIN)
    steps = [16, 32, 64]
    errors = [(sample(gaussian_denoiser, x, sigmas("logsnr", n, SIGMA_MIN, SIGMA_MAX, append_zero=False), solver)
               - target).abs().max().item() for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    low, high = EXPECTED_ORDER[solver]
    assert low <= slope <= high, f"{solver}: observed order {slope:.2f}, errors {errors}"


def test_third_order_beats_second_order_at_equal_nfe():
    x = start_noise()
    target = exact_flow(x, SIGMA_MAX, SIGMA_MIN)
    schedule = sigmas("logsnr", 40, SIGMA_MIN, SIGMA_MAX, append_zero=False)
    error = {name: (sample(gaussian_denoiser, x, schedule, name) - target).abs().max().item()
             for name in ("dpmpp_2m", "dpmpp_3m_taylor")}
    assert error["dpmpp_3m_taylor"] < error["dpmpp_2m"] / 10, error


def test_dpm_solver_1_is_ddim_and_euler():
    x = start_noise()
    schedule = sigmas("karras", 7, SIGMA_MIN, SIGMA_MAX)
    ddim = x.clone()
    for sigma_s, sigma_t in zip(schedule[:-1].tolist(), schedule[1:].tolist()):
        x0 = gaussian_denoiser(ddim, torch.full((len(ddim),), sigma_s, dtype=torch.float64))
        ddim = x0 + sigma_t / sigma_s * (ddim - x0)                       # DDIM in VE form
    dpm1 = sample(gaussian_denoiser, x, schedule, "dpm_solver_1")
    torch.testing.assert_close(dpm1, ddim, rtol=0, atol=1e-12)
    torch.testing.assert_close(sample(gaussian_denoiser, x, schedule, "euler"), dpm1, rtol=0, atol=1e-11)


def test_dpmpp_3m_coefficients_are_the_exponential_taylor_integrals():
    for h in (1e-3, 0.3, 2.0):
        grid = np.linspace(0.0, h, 200001)
        kernel = np.exp(grid - h)
        expected = [np.trapezoid(kernel * grid ** n / math.factorial(n), grid) for n in range(3)]
        np.testing.assert_allclose(dpmpp_3m_coefficients(h), expected, rtol=1e-6, atol=1e-16)
        expanded_form = (-math.expm1(-h), (math.expm1(-h) / h + 1) * h, -((math.expm1(-h) + h) / h ** 2 - 0.5) * h ** 2)
        np.testing.assert_allclose(dpmpp_3m_coefficients(h), expanded_form, rtol=1e-9, atol=1e-18)


def test_gaussian_mixture_teacher_20_steps_dpmpp_2m_close_to_exact():
    torch.set_num_threads(1)     # 64 x 2 tensors: a second thread only adds contention (conftest resets it)
    generator = torch.Generator().manual_seed(1)
    teacher = GaussianMixtureDenoiser(torch.randn(3, 2, generator=generator, dtype=torch.float64) * 2,
                                      torch.tensor([0.5, 0.8, 0.6], dtype=torch.float64))
    x = 20.0 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
    reference = sample(teacher, x, sigmas("logsnr", 60, SIGMA_MIN, 20.0), "dpm_solver_3")   # 180 NFE, float64
    check = sample(teacher, x, sigmas("logsnr", 40, SIGMA_MIN, 20.0), "dpm_solver_3")
    assert (reference - check).abs().max() < 1e-4                  # the reference is converged far below 0.03
    schedule = sigmas("karras", 20, SIGMA_MIN, 20.0)
    error = {name: (sample(teacher, x, schedule, name) - reference).norm(dim=1) for name in ("dpmpp_2m", "euler")}
    assert error["dpmpp_2m"].mean() < 0.04 and error["dpmpp_2m"].max() < 0.1    # data spread is ~2-4
    assert error["dpmpp_2m"].mean() < error["euler"].mean() / 3


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_reaches_zero_finite_and_keeps_float32(solver):
    x = start_noise(dtype=torch.float32)
    out = sample(gaussian_denoiser, x, sigmas("karras", 6, SIGMA_MIN, SIGMA_MAX), solver,
                 **({"generator": torch.Generator().manual_seed(0)} if solver == "dpmpp_2m_sde" else {}))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the exact flow ends on the data distribution: every coordinate near the Gaussian's range. UniPC's bh1 scales
    # its extrapolation by B(h) = -h, which overshoots on Karras' long first steps (10 std here; Diffusers' bh1 gives
    # the same numbers, tests/test_samplers_unipc.py)
    assert ((out.double() - MEAN).abs() / STD).max() < (12 if solver == "unipc_bh1" else 8)


def test_float64_in_float64_out_and_fp16_model_read_in_fp32():
    x = start_noise()
    assert sample(gaussian_denoiser, x, sigmas("logsnr", 4, SIGMA_MIN, SIGMA_MAX), "dpmpp_3m").dtype == torch.float64
    seen = []

    def half_precision_model(x_in, sigma, cond=None):
        seen.append(x_in.dtype)
        return gaussian_denoiser(x_in, sigma).half()

    out = sample(half_precision_model, x.float(), sigmas("logsnr", 4, SIGMA_MIN, SIGMA_MAX), "dpmpp_2m")
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_nfe_matches_counted_network_calls(solver):
    schedule = sigmas("karras", 5, SIGMA_MIN, SIGMA_MAX)
    counter = CountingDenoiser(gaussian_denoiser)
    sample(counter, start_noise(4), schedule, solver)
    assert counter.calls == nfe(solver, 5)


def test_nfe_values():
    assert [nfe(name, 10) for name in ("euler", "heun", "dpm_solver_3", "dpmpp_2s", "dpmpp_3m")] == [10, 19, 27, 19, 10]
    assert nfe("heun", 10, to_zero=False) == 20
    assert nfe("dpm_solver_3", 20, to_zero=False) == 60
    assert nfe("dpm_solver_3", 20, to_zero=False, lower_order_final=True) == 60    # >= 15 steps: no lowering


def test_step_orders_warm_up_and_lower_order_final():
    """Below 8 multistep steps the final denoise is not an integration step: the step into sigma_min is first order
    (plumbing.integration_steps); from 8 steps on, and for singlestep methods, it counts as the last step."""
    schedule = sigmas("logsnr", 6, SIGMA_MIN, SIGMA_MAX).tolist()
    assert step_orders(schedule, 3, multistep=True, lower_order_final=True) == [1, 2, 3, 2, 1, 0]
    assert step_orders(schedule, 3, multistep=False, lower_order_final=True) == [3, 3, 3, 3, 2, 0]
    longer = sigmas("logsnr", 8, SIGMA_MIN, SIGMA_MAX).tolist()
    assert step_orders(longer, 3, multistep=True, lower_order_final=True) == [1, 2, 3, 3, 3, 3, 2, 0]
    assert step_orders(schedule[:-1], 3, multistep=True, lower_order_final=True) == [1, 2, 3, 2, 1]
    assert step_orders(schedule[:-1], 3, multistep=True, lower_order_final=False) == [1, 2, 3, 3, 3]
    assert step_orders(schedule, 2, multistep=False, lower_order_final=False) == [2, 2, 2, 2, 2, 0]


def test_conditioning_reaches_denoiser_and_guidance_wrapper_samples():
    teacher = GaussianMixtureDenoiser(torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64),
                                      torch.tensor([0.3, 0.3], dtype=torch.float64), labels=torch.tensor([0, 1]))
    labels = torch.tensor([0, 1, 1, 0])
    noise = 10.0 * torch.randn(4, 2, dtype=torch.float64)
    out = sample(teacher, noise, sigmas("karras", 12, SIGMA_MIN, 10.0), "dpmpp_3m", cond=labels)
    assert torch.equal(out[:, 0] > 0, labels == 1)
    guided = ClassifierFreeGuidance(teacher, scale=2.0, uncond=None)
    out_guided = sample(guided, noise, sigmas("karras", 12, SIGMA_MIN, 10.0), "dpmpp_2m", cond=labels)
    assert torch.equal(out_guided[:, 0] > 0, labels == 1)


def test_dpmpp_2m_sde_deterministic_given_generator_and_eta0_is_2m():
    x = start_noise(dtype=torch.float32)
    schedule = sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX)

    def run(seed, eta=1.0):
        return sample(gaussian_denoiser, x, schedule, "dpmpp_2m_sde", eta=eta,
                      generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert (run(3) - run(4)).abs().max() > 1e-3
    torch.testing.assert_close(run(3, eta=0.0), sample(gaussian_denoiser, x, schedule, "dpmpp_2m"), rtol=0, atol=1e-5)


def test_dpmpp_2m_sde_samples_the_gaussian():
    """The SDE keeps the marginals: final samples have the data mean and std (statistically)."""
    noise = SIGMA_MAX * torch.randn(4000, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = sample(gaussian_denoiser, noise, sigmas("karras", 40, SIGMA_MIN, SIGMA_MAX), "dpmpp_2m_sde",
                 generator=torch.Generator().manual_seed(6))
    np.testing.assert_allclose(out.std(0).numpy(), STD[0].numpy(), rtol=0.1)
    assert ((out.mean(0) - MEAN[0]).abs() / STD[0]).max() < 0.1


def test_schedules():
    karras = sigmas("karras", 10, SIGMA_MIN, SIGMA_MAX)
    assert len(karras) == 11 and karras[-1] == 0 and math.isclose(karras[0], SIGMA_MAX) \
        and math.isclose(karras[-2], SIGMA_MIN)
    ramp = karras[:-1] ** (1 / 7)
    torch.testing.assert_close(ramp.diff(), ramp.diff()[:1].expand(9))             # uniform in sigma^(1/rho)
    logsnr = sigmas("logsnr", 10, SIGMA_MIN, SIGMA_MAX, append_zero=False)
    assert len(logsnr) == 11 and math.isclose(logsnr[-1], SIGMA_MIN)
    torch.testing.assert_close(logsnr.log().diff(), logsnr.log().diff()[:1].expand(10))
    assert len(sigmas("logsnr", 1, SIGMA_MIN, SIGMA_MAX)) == 2


def test_time_uniform_schedule_is_uniform_in_vp_time():
    beta_min, beta_max = 0.1, 20.0
    values = sigmas("time_uniform", 8, 0.01, 50.0, append_zero=False, beta_min=beta_min, beta_max=beta_max)
    beta_d = beta_max - beta_min
    t = ((beta_min ** 2 + 2 * beta_d * torch.log1p(values ** 2)).sqrt() - beta_min) / beta_d
    torch.testing.assert_close(t.diff(), t.diff()[:1].expand(8))
    assert math.isclose(values[0], 50.0) and math.isclose(values[-1], 0.01)
    # discrete table (linear betas, 1000 steps): sigma at integer timesteps is the table's own sigma
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    values = sigmas("time_uniform", 9, table[99].item(), table[999].item(), alphas_cumprod=alphas_cumprod,
                    append_zero=False)
    torch.testing.assert_close(values, table[torch.arange(999, 98, -100)])
    zero_terminal_snr = torch.cat([alphas_cumprod[:-1], torch.zeros(1, dtype=torch.float64)])
    values = sigmas("time_uniform", 4, 0.1, 100.0, alphas_cumprod=zero_terminal_snr)
    assert torch.isfinite(values).all() and math.isclose(values[0], 100.0) and values[-1] == 0


@pytest.mark.parametrize("call, message", [
    (lambda: sigmas("cosine", 10), "allowed: karras, logsnr, time_uniform"),
    (lambda: sigmas("karras", 0), "num_steps"),
    (lambda: sigmas("karras", 5, 1.0, 0.5), "sigma_min"),
    (lambda: sample(gaussian_denoiser, start_noise(), sigmas("karras", 3), "rk45"), "allowed: euler, heun"),
    (lambda: sample(gaussian_denoiser, start_noise(), torch.tensor([1.0, 2.0, 0.0]), "euler"), "strictly decreasing"),
    (lambda: sample(gaussian_denoiser, start_noise(), torch.tensor([1.0, 0.0, 0.0]), "euler"), "strictly decreasing"),
    (lambda: sample(gaussian_denoiser, start_noise(), torch.tensor([1.0]), "euler"), "at least 2"),
    (lambda: sample(gaussian_denoiser, start_noise(), sigmas("karras", 3), "dpmpp_2m_sde", eta=-1), "eta"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
