"""The exact density ratio of f-distill on a Gaussian-mixture teacher (diagnostics' oracle)."""
import math

import pytest
import torch

from fdistill.benchmarks.oracle import OracleRatioFDistill, noised_sample_log_density, oracle_log_ratio
from fdistill.denoisers import GaussianMixtureDenoiser


def _log_normal(x, mean, var):
    return -0.5 * (((x - mean) ** 2).sum(-1) / var + x.shape[-1] * torch.log(2 * math.pi * torch.as_tensor(var, dtype=torch.float64)))


def test_oracle_log_ratio_closed_form():
    """Teacher N(mu, s^2 I), student a point mass at c (every sample at c): q_sigma = N(c, sigma^2 I), so
    log r = log N(x; mu, s^2 + sigma^2) - log N(x; c, sigma^2) exactly."""
    mu, s, c = torch.tensor([1.0, -2.0]), 0.3, torch.tensor([0.5, 0.5])
    teacher = GaussianMixtureDenoiser(mu[None], torch.tensor([s]))
    x_t = torch.tensor([[0.0, 0.0], [1.0, -2.0], [2.0, 1.0]], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    expected = _log_normal(x_t, mu.double(), s ** 2 + sigma ** 2) - _log_normal(x_t, c.double(), sigma ** 2)
    got = oracle_log_ratio(teacher, x_t, sigma, c[None].repeat(7, 1))
    assert torch.allclose(got, expected, atol=1e-10)


def test_noised_sample_density_is_the_mixture_of_sample_kernels():
    samples = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    x_t, sigma = torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    expected = torch.log((torch.exp(_log_normal(x_t, samples[0], 0.49)) + 2 * torch.exp(_log_normal(x_t, samples[1], 0.49))) / 3)
    assert torch.allclose(noised_sample_log_density(x_t, sigma, samples, chunk=2), expected, atol=1e-12)


def test_oracle_ratio_near_one_when_student_samples_the_teacher():
    """A student that samples the teacher exactly: log r ~ 0 at a noise level well above the kernel spacing."""
    teacher = GaussianMixtureDenoiser(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.2, 0.2]),
                                      torch.tensor([0.8, 0.2]))
    student = teacher.sample(20000, torch.Generator().manual_seed(0))
    x_t = teacher.sample(200, torch.Generator().manual_seed(1)) + 0.5 * torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    log_r = oracle_log_ratio(teacher, x_t, torch.full((200,), 0.5), student)
    assert log_r.abs().mean() < 0.05
    # and a student that drops the light mode: large r at that mode, r < 1 at the heavy one
    heavy_only = student[student[:, 0] < 0]
    log_r = oracle_log_ratio(teacher, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.full((2,), 0.2), heavy_only)
    assert log_r[0] > 5 and log_r[1] == pytest.approx(math.log(0.8), abs=0.05)


def test_oracle_method_weights_use_the_exact_ratio():
    """OracleRatioFDistill's logits are the oracle log r of the student's noised samples (up to the reference
    samples' Monte-Carlo error)."""
    from fdistill.benchmarks.fdistill_2d import recipe
    from fdistill.data import gaussian_mixture
    from fdistill.methods.fdistill import build

    torch.manual_seed(0)
    data = gaussian_mixture(preset="ring8", dim=2, num_samples=512)
    teacher = data.extras["denoiser"]
    method = build(recipe("kl"), None, data)
    oracle = OracleRatioFDistill(method.config, teacher, method.networks["student"], method.networks["fake_score"],
                                 method.domain)
    item = oracle._draw({"x": teacher.sample(64)}, torch.device("cpu"))
    log_r = oracle._student_logit(item, keep=False)
    with torch.no_grad():
        x_t = oracle.generated(item) + item.sigma[:, None] * item.eps
        expected = oracle_log_ratio(teacher, x_t, item.sigma, oracle.generate(OracleRatioFDistill.num_reference))
    assert log_r.shape == (64,)
    assert torch.corrcoef(torch.stack([log_r.double(), expected]))[0, 1] > 0.95


def test_exact_student_denoiser_is_the_posterior_mean_of_the_student_samples():
    from fdistill.benchmarks.oracle import ExactStudentDenoiser

    points = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    denoiser = ExactStudentDenoiser(torch.nn.Linear(2, 2), lambda num: points.repeat(num // 2, 1), num_reference=4)
    x_t, sigma = torch.tensor([[0.5, 0.3]]), torch.tensor([1.0])
    # posterior over the two points: softmax(x . p / sigma^2) = sigmoid(2 * 0.5) for +1
    expected = 2 * torch.sigmoid(torch.tensor(1.0)) - 1
    assert torch.allclose(denoiser(x_t, sigma), torch.tensor([[float(expected), 0.0]]), atol=1e-6)
