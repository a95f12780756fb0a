"""DPM-Solver-v3 (fdistill.samplers.dpm_solver_v3): reductions to DPM-Solver++, convergence order, and empirical model
statistics on the exact Gaussian teacher of tests/test_samplers.py (where l, s, b have closed forms)."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.samplers import ModelStatistics, compute_ems, dpmpp_3m_coefficients, nfe, sample, sigmas, step_orders
from fdistill.samplers.reference import diffusers_sample

from test_samplers import MEAN, SIGMA_MAX, SIGMA_MIN, STD, exact_flow, gaussian_denoiser, start_noise

LAMBDAS = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 121, dtype=torch.float64)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compute_ems.py"  # independent of the cwd


def taylor_dpmpp_multistep(x, sigma_list, max_order):
    """Reference: multistep DPM-Solver++ whose x0-derivatives at lambda_s are those of the polynomial through the
    last `order` x0's, integrated exactly against e^{lambda - lambda_t} (dpmpp_3m_coefficients): what DPM-Solver-v3
    must reduce to with l = 1, s = b = 0 (Zheng et al. 2023, Sec. 3.1)."""
    values = sigma_list.tolist()
    orders = step_orders(values, max_order, multistep=True, lower_order_final=True)
    history = []                                            # (lambda, x0), newest first
    for i, order in enumerate(orders):
        x0 = gaussian_denoiser(x, torch.full((len(x),), values[i], dtype=torch.float64))
        if order == 0:
            return x0
        history = [(-math.log(values[i]), x0)] + history[:2]
        h = math.log(values[i] / values[i + 1])
        c0, c1, c2 = dpmpp_3m_coefficients(h)
        derivative, second = 0.0, 0.0
        if order >= 2:
            (lam_s, d_s), (lam_1, d_1) = history[:2]
            derivative = (d_s - d_1) / (lam_s - lam_1)
        if order == 3:
            lam_2, d_2 = history[2]
            curvature = (derivative - (d_1 - d_2) / (lam_1 - lam_2)) / (lam_s - lam_2)
            derivative, second = derivative + (lam_s - lam_1) * curvature, 2 * curvature
        x = math.exp(-h) * x + c0 * x0 + c1 * derivative + c2 * second
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
def test_neutral_statistics_reduce_to_multistep_dpm_solver_pp(order, schedule):
    """l = 1, s = b = 0 (the default without EMS) and no corrector: multistep DPM-Solver++ with Taylor weights."""
    x = start_noise()
    sigma_list = sigmas(schedule, 12, SIGMA_MIN, SIGMA_MAX)
    expected = taylor_dpmpp_multistep(x, sigma_list, order)
    for ems in (None, ModelStatistics.constant(l=1.0)):
        out = sample(gaussian_denoiser, x, sigma_list, "dpm_solver_v3", ems=ems, order=order, corrector=False,
                     predictor_pseudo=False)
        torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)


def test_order_two_equals_diffusers_second_order_taylor_dpm_solver_pp():
    """Independent check: Diffusers' DPMSolverMultistepScheduler(solver_order=2, solver_type="heun") is the same
    Taylor-weighted 2M (on Stable Diffusion's sigma range, through the VP <-> sigma conversion)."""
    x = start_noise()
    sigma_list = sigmas("karras", 10, 0.029167, 14.614641)
    expected = diffusers_sample(DPMSolverMultistepScheduler(solver_order=2, solver_type="heun"), gaussian_denoiser,
                                x, sigma_list)
    out = sample(gaussian_denoiser, x, sigma_list, "dpm_solver_v3", order=2, corrector=False)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-6


def test_noise_prediction_statistics_first_order_is_ddim():
    """l = 0, s = -1 is noise prediction (g = sigma_s eps, DPM-Solver); its first order is DDIM like
    DPM-Solver++'s."""
    x = start_noise()
    sigma_list = sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX)
    noise_prediction = ModelStatistics.constant(l=0.0, s=-1.0)
    out = sample(gaussian_denoiser, x, sigma_list, "dpm_solver_v3", ems=noise_prediction, order=1, corrector=False)
    torch.testing.assert_close(out, sample(gaussian_denoiser, x, sigma_list, "dpm_solver_1"), rtol=1e-8, atol=1e-8)


def convergence_slope(steps: list[int], **options) -> tuple[float, list[float]]:
    """Slope of log max-error vs log steps of dpm_solver_v3 on the exact Gaussian flow (log-SNR steps), and the errors."""
    x = start_noise()
    target = exact_flow(x, SIGMA_MAX, SIGMA_MIN)
    errors = [(sample(gaussian_denoiser, x, sigmas("logsnr", n, SIGMA_MIN, SIGMA_MAX, append_zero=False),
                      "dpm_solver_v3", **options) - target).abs().max().item() for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("corrector, expected", [(False, (2.8, 5.0)), (True, (2.8, 5.5))])
def test_convergence_order_on_exact_gaussian_flow(corrector, expected):
    slope, errors = convergence_slope([16, 32, 64], corrector=corrector)
    assert expected[0] <= slope <= expected[1], (slope, errors)


def test_pseudo_order_corrector_is_only_second_order():
    """The pseudo-order corrector (the authors' default) estimates g'(lambda_s) by the chord to lambda_t: O(h) off,
    so it converges at order 2, which is why the full-order corrector is the default here."""
    slope, errors = convergence_slope([32, 64, 128], corrector_pseudo=True)
    assert 1.5 <= slope <= 2.5, (slope, errors)


def test_one_network_evaluation_per_step():
    for steps in (1, 2, 5, 10):
        assert nfe("dpm_solver_v3", steps) == steps
        assert nfe("dpm_solver_v3", steps, to_zero=False) == steps


@pytest.fixture(scope="module")
def gaussian_ems():
    return compute_ems(gaussian_denoiser, (MEAN.shape[1],), 64, LAMBDAS)


def test_ems_of_the_gaussian_teacher_match_the_closed_form(gaussian_ems):
    """For x0 ~ N(m, diag(v)): D = m + v / (v + sigma^2) (x - m), so l = sigma^2 / (v + sigma^2) = 1 / (1 + v e^{2
    lambda}), f = (1 - l) x - D = -l m is deterministic and f' = -l' m = 2 l (1 - l) m: s = 0, b = 2 l (1 - l) m."""
    stats = gaussian_ems
    for value in (stats.l, stats.s, stats.b):
        assert value.shape == (len(LAMBDAS), MEAN.shape[1]) and torch.isfinite(value).all()
    l_exact = 1 / (1 + STD[0] ** 2 * torch.exp(2 * LAMBDAS)[:, None])
    torch.testing.assert_close(stats.l, l_exact, rtol=0, atol=1e-8)
    assert stats.s.abs().max() < 0.1                          # f has (almost) no variance: s is only regularised
    b_exact = 2 * l_exact * (1 - l_exact) * MEAN[0]
    torch.testing.assert_close(stats.b, b_exact, rtol=0, atol=1e-2 * b_exact.abs().max().item())


@pytest.mark.parametrize("steps", [5, 8, 10])
def test_gaussian_ems_make_few_step_sampling_nearly_exact(gaussian_ems, steps):
    """With its EMS the Gaussian's ODE is linear in the v3 parameterisation (g is constant): the error left is the
    statistics' interpolation, orders of magnitude below DPM-Solver++(3M) and UniPC at 5-10 steps."""
    x = start_noise()
    target = gaussian_denoiser(exact_flow(x, SIGMA_MAX, SIGMA_MIN), torch.full((len(x),), SIGMA_MIN,
                                                                               dtype=torch.float64))
    sigma_list = sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX)
    error = {name: (sample(gaussian_denoiser, x, sigma_list, name, **options) - target).abs().max().item()
             for name, options in [("dpm_solver_v3", {"ems": gaussian_ems}), ("dpmpp_3m", {}), ("unipc_bh2", {})]}
    assert error["dpm_solver_v3"] < 1e-2 and error["dpm_solver_v3"] < min(error["dpmpp_3m"], error["unipc_bh2"]) / 50, \
        error


def test_float32_ems_are_as_good_as_float64_ems():
    """EMS computed in float32 (what a network gives) must not be ruined by rounding in the finite differences:
    sampling with them is about as accurate as with float64 EMS, and far better than without EMS."""
    generator = torch.Generator().manual_seed(0)
    teacher = GaussianMixtureDenoiser(torch.randn(4, 64, generator=generator, dtype=torch.float64),
                                      torch.full((4,), 0.3), sample_shape=(1, 8, 8))
    lambdas = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 41, dtype=torch.float64)
    x = SIGMA_MAX * torch.randn(8, 1, 8, 8, generator=generator)
    schedule = sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX)
    reference = sample(teacher, x.double(), sigmas("logsnr", 100, SIGMA_MIN, SIGMA_MAX), "dpm_solver_3").float()

    def error(**options):
        return (sample(teacher, x, schedule, "dpm_solver_v3", **options) - reference).flatten(1).norm(dim=1).median()

    ems = {dtype: compute_ems(teacher, (1, 8, 8), 64, lambdas, dtype=dtype) for dtype in (torch.float64, torch.float32)}
    assert ems[torch.float32].l.shape == (41, 1, 8, 8)
    assert error(ems=ems[torch.float32]) < 1.5 * error(ems=ems[torch.float64])
    assert error(ems=ems[torch.float32]) < error() / 10


def test_ems_save_load_round_trip_and_bad_files(gaussian_ems, tmp_path):
    path = tmp_path / "ems.safetensors"
    gaussian_ems.save(path)
    loaded = ModelStatistics.load(path)
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(loaded, name), getattr(gaussian_ems, name))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelStatistics.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"l": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an EMS file"):
        ModelStatistics.load(tmp_path / "other.safetensors")


def test_statistics_validation_and_range_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        ModelStatistics(torch.tensor([1.0, 0.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="l must be"):
        ModelStatistics(torch.tensor([0.0, 1.0]), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    narrow = ModelStatistics.constant(lambda_range=(-1.0, 1.0))
    with pytest.raises(ValueError, match="statistics' lambda range"):
        sample(gaussian_denoiser, start_noise(), sigmas("karras", 5, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3", ems=narrow)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        sample(gaussian_denoiser, start_noise(), sigmas("karras", 5, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3", order=4)


def test_compute_ems_script_writes_a_loadable_file(tmp_path):
    out = tmp_path / "mild.safetensors"
    result = subprocess.run([sys.executable, str(SCRIPT), "--teacher", "mixture_mild", "--num-samples",
                             "32", "--grid", "21", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stats = ModelStatistics.load(out)
    assert stats.l.shape == (21, 16) and torch.isfinite(stats.b).all()
    bad = subprocess.run([sys.executable, str(SCRIPT), "--teacher", "nope", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr


def varying_statistics(elements: int = MEAN.shape[1]) -> ModelStatistics:
    """Per-element statistics that vary along lambda (so every coefficient is non-trivial)."""
    phase = LAMBDAS[:, None] * torch.linspace(0.3, 1.9, elements, dtype=torch.float64)
    return ModelStatistics(LAMBDAS, 0.8 + 0.2 * torch.sin(phase), -0.3 * torch.cos(phase), 0.05 * torch.sin(2 * phase))


def per_step_simpson(integrals, lam_s: float, lam_t: float, intervals: int = 128):
    """Reference: one step's (decay, [Phi_k e^{L_s - L_t}, k = 0..3], b-term) by composite Simpson, node by node."""
    h = (lam_t - lam_s) / intervals
    weights = [1 if n in (0, intervals) else (4 if n % 2 else 2) for n in range(intervals + 1)]
    L, S, B = integrals.at(torch.tensor([lam_s + n * h for n in range(intervals + 1)], dtype=torch.float64))
    phis, b_term = [0.0] * 4, 0.0
    for n, weight in enumerate(weights):
        kernel = weight * h / 3 * torch.exp(L[n] - L[-1] + S[n] - S[0])
        phis = [phi + kernel * (n * h) ** k / math.factorial(k) for k, phi in enumerate(phis)]
        b_term = b_term + weight * h / 3 * torch.exp(L[n] - L[-1] + S[n]) * (B[n] - B[0])
    return torch.exp(L[0] - L[-1]), torch.stack(phis), b_term


def test_schedule_coefficients_equal_the_per_step_quadrature(monkeypatch):
    """The coefficients precomputed for the whole schedule (vectorised, in chunks of steps) are the per-step Simpson
    quadrature of the statistics' integrals to 1e-10 (float64)."""
    module = sys.modules["fdistill.samplers.dpm_solver_v3"]
    integrals = module._Integrals(varying_statistics())
    lambdas = (-torch.log(sigmas("karras", 10, SIGMA_MIN, SIGMA_MAX)[:-1])).tolist()
    elements = MEAN.shape[1]
    monkeypatch.setattr(module, "QUADRATURE_CHUNK_ELEMENTS", 3 * elements * 129)      # 3 steps per chunk: 4 chunks
    coefficients = module._ScheduleCoefficients(integrals, lambdas, torch.zeros((), dtype=torch.float64))
    assert coefficients.phis.shape == (len(lambdas) - 1, 4, elements)
    for step, (lam_s, lam_t) in enumerate(zip(lambdas, lambdas[1:])):
        decay, phis, b_term = per_step_simpson(integrals, lam_s, lam_t)
        torch.testing.assert_close(coefficients.decay[step], decay, rtol=0, atol=1e-10)
        torch.testing.assert_close(coefficients.phis[step], phis, rtol=0, atol=1e-10)
        torch.testing.assert_close(coefficients.b_term[step], b_term, rtol=0, atol=1e-10)
        assert b_term.abs().max() > 1e-4 and (phis[3].abs() > 1e-4).all()          # the comparison is not vacuous


def test_statistics_are_integrated_once_per_call_not_per_step(monkeypatch):
    """The per-step cost has no quadrature: the tabulated integrals are looked up a fixed number of times per
    sample() call (2: the schedule's lambdas, then one chunk of quadrature nodes), whatever the step count."""
    module = sys.modules["fdistill.samplers.dpm_solver_v3"]
    calls = []
    original = module._Integrals.at
    monkeypatch.setattr(module._Integrals, "at",
                        lambda self, lambdas: calls.append(len(lambdas)) or original(self, lambdas))
    x = start_noise()
    for steps in (5, 20):
        calls.clear()
        sample(gaussian_denoiser, x, sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3",
               ems=varying_statistics())
        assert len(calls) == 2, (steps, calls)


def test_coefficients_are_reused_across_calls_with_the_same_statistics_and_schedule(monkeypatch):
    """A second sample() call with the same statistics object and sigma list does no quadrature at all (the
    coefficients are cached) and gives the same samples; another sigma list is integrated afresh."""
    module = sys.modules["fdistill.samplers.dpm_solver_v3"]
    calls = []
    original = module._Integrals.at
    monkeypatch.setattr(module._Integrals, "at",
                        lambda self, lambdas: calls.append(len(lambdas)) or original(self, lambdas))
    stats, x = varying_statistics(), start_noise()
    schedule = sigmas("karras", 6, SIGMA_MIN, SIGMA_MAX)
    first = sample(gaussian_denoiser, x, schedule, "dpm_solver_v3", ems=stats)
    calls.clear()
    torch.testing.assert_close(sample(gaussian_denoiser, x, schedule, "dpm_solver_v3", ems=stats), first,
                               rtol=0, atol=0)
    assert calls == []
    sample(gaussian_denoiser, x, sigmas("logsnr", 6, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3", ems=stats)
    assert len(calls) == 2


def literal_update(coefficients, x_s, nodes, pseudo):
    """Paper Eq. 11 term by term (the reference for the fused update): g_j = e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s),
    g^{(k)} from the Taylor system (full) or Newton divided differences (pseudo), then
    x_t = e^{L_s - L_t} x_s - b_term - sum_k e^{L_s - L_t} Phi_k g^{(k)}."""
    s, lambdas = nodes[0][0], coefficients.lambdas
    S, B = coefficients.S, coefficients.B
    g = [torch.exp(S[s] - S[j]) * f - torch.exp(S[s]) * (B[j] - B[s]) for j, f in nodes]
    d = [(lambdas[j] - lambdas[s]).item() for j, _ in nodes]
    n = len(nodes) - 1
    if pseudo:
        table, derivatives = g, [g[0]]
        for k in range(1, n + 1):
            table = [(table[j + 1] - table[j]) / (d[j + k] - d[j]) for j in range(len(table) - 1)]
            derivatives.append(math.factorial(k) * table[0])
    elif n == 0:
        derivatives = [g[0]]
    else:
        system = torch.tensor([[dj ** k / math.factorial(k) for k in range(1, n + 1)] for dj in d[1:]],
                              dtype=torch.float64)
        right = torch.stack([gj - g[0] for gj in g[1:]]).reshape(n, -1)
        derivatives = [g[0]] + list(torch.linalg.solve(system, right).reshape(n, *g[0].shape))
    x_t = coefficients.decay[s] * x_s - coefficients.b_term[s]
    for phi, derivative in zip(coefficients.phis[s], derivatives):
        x_t = x_t - phi * derivative
    return x_t


@pytest.mark.parametrize("pseudo", [False, True])
def test_fused_update_equals_the_term_by_term_update(pseudo):
    """dpm_solver_v3_update's one linear combination (weights folded per step) is Eq. 11 term by term to 1e-10
    (float64, per-element statistics), for predictor nodes (s, s-1, s-2) and corrector nodes (s, s+1, s-1)."""
    module = sys.modules["fdistill.samplers.dpm_solver_v3"]
    lambdas = (-torch.log(sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX)[:-1])).tolist()
    coefficients = module._ScheduleCoefficients(module._Integrals(varying_statistics()), lambdas,
                                                torch.zeros((), dtype=torch.float64))
    generator = torch.Generator().manual_seed(3)
    x_s = torch.randn(5, MEAN.shape[1], generator=generator, dtype=torch.float64)
    for indices in [(3,), (3, 2), (3, 2, 1), (4, 5), (4, 5, 3), (5, 6, 4)]:
        nodes = [(j, torch.randn(5, MEAN.shape[1], generator=generator, dtype=torch.float64)) for j in indices]
        fused = module.dpm_solver_v3_update(coefficients, x_s, nodes, pseudo)
        torch.testing.assert_close(fused, literal_update(coefficients, x_s, nodes, pseudo), rtol=0, atol=1e-10)


def test_a_step_is_a_few_fused_tensor_operations():
    """The per-step cost outside the network: with cached coefficients a step of dpm_solver_v3 (per-element
    statistics, corrector on) makes at most 20 torch calls (f: 2, predictor and corrector: one addcmul per node + 1,
    the denoiser binding: the rest); the term-by-term update made 86."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Calls.count += 1
            return func(*args, **(kwargs or {}))

    stats, x = varying_statistics(), start_noise()
    cached = torch.zeros_like(x)

    def calls(steps):
        schedule = sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX)
        sample(lambda x, sigma, cond=None: cached, x, schedule, "dpm_solver_v3", ems=stats)    # fills the cache
        Calls.count = 0
        with Calls():
            sample(lambda x, sigma, cond=None: cached, x, schedule, "dpm_solver_v3", ems=stats)
        return Calls.count
    per_step = (calls(20) - calls(10)) / 10
    assert per_step <= 20, per_step


def test_ems_of_the_learned_digits_teacher_improve_its_few_step_samples():
    """The shipped class-conditional digits teacher (a float32 network): EMS from compute_ems on its own samples,
    with the labels as the condition, make 8-step dpm_solver_v3 closer to a fine solve than without them."""
    from fdistill.networks import digits_teacher
    teacher = digits_teacher()
    labels = torch.arange(16) % 10
    lambdas = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 21, dtype=torch.float64)
    ems = compute_ems(teacher, (1, 8, 8), 16, lambdas, labels, dtype=torch.float32, sampling_steps=20)
    assert ems.l.shape == (21, 1, 8, 8)
    x = SIGMA_MAX * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = sample(teacher, x, sigmas("logsnr", 40, SIGMA_MIN, SIGMA_MAX), "dpm_solver_3", labels)

    def error(**options):
        out = sample(teacher, x, sigmas("karras", 8, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3", labels, **options)
        return (out - reference).flatten(1).norm(dim=1).median().item()

    assert error(ems=ems) < 0.8 * error(), (error(ems=ems), error())


def karras_run(steps: int, **options):
    """dpm_solver_v3 with the varying per-element statistics on Karras sigmas from the shared start."""
    return sample(gaussian_denoiser, start_noise(), sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX), "dpm_solver_v3",
                  ems=VARYING_STATISTICS, **options)


VARYING_STATISTICS = varying_statistics()     # one object: the coefficient cache serves every karras_run


def test_default_order_is_two_below_ten_steps_and_three_from_ten():
    """dpm_solver_v3's default predictor order follows the step count (dpm_solver_v3.default_order)."""
    torch.testing.assert_close(karras_run(8), karras_run(8, order=2), rtol=0, atol=0)
    assert (karras_run(8) - karras_run(8, order=3)).abs().max() > 1e-6
    torch.testing.assert_close(karras_run(10), karras_run(10, order=3), rtol=0, atol=0)


def test_default_predictor_is_pseudo_order_below_fifteen_steps():
    """dpm_solver_v3's predictor uses pseudo-order by default below 15 steps (dpm_solver_v3.default_predictor_pseudo),
    the full Taylor solve from 15 on; at 10 steps (order 3) the two differ."""
    torch.testing.assert_close(karras_run(10), karras_run(10, predictor_pseudo=True), rtol=0, atol=0)
    torch.testing.assert_close(karras_run(15), karras_run(15, predictor_pseudo=False), rtol=0, atol=0)
    assert (karras_run(10) - karras_run(10, predictor_pseudo=False)).abs().max() > 1e-6
