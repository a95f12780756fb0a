"""f-distill's DMD regression loss and warm-ups: the teacher's ODE pairs, the phase schedule, and a student that the
regression warm-up moves from one point onto the teacher's modes."""
import tempfile

import pytest
import torch

from fdistill.data import gaussian_mixture
from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.methods.base import StepContext
from fdistill.methods.fdistill import FDistill, FDistillConfig, PixelDomain
from fdistill.methods.fdistill.regression import teacher_ode_pairs
from fdistill.networks import MLPDenoiser
from fdistill.training import Trainer
from fdistill.training.config import TrainConfig

TWO_MODES = dict(means=[[-2.0, 0.0], [2.0, 0.0]], stds=[0.1, 0.1], weights=[0.5, 0.5])


def test_ode_pairs_of_a_gaussian_teacher_follow_its_affine_ode_map():
    # data N(m, s^2): x_sigma = m + sqrt(s^2 + sigma^2) u along the probability-flow ODE (u fixed), so the ODE maps
    # x_T = sigma_max z to m + s (sigma_max z - m) / sqrt(s^2 + sigma_max^2)
    m, s, sigma_max = torch.tensor([1.0, -0.5]), 0.3, 5.0
    teacher = GaussianMixtureDenoiser(m[None].double(), torch.tensor([s], dtype=torch.float64))
    z, y = teacher_ode_pairs(teacher, 256, (2,), sigma_max, sigma_max, 0.01, 20)
    expected = m + s * (sigma_max * z - m) / (s ** 2 + sigma_max ** 2) ** 0.5
    assert torch.allclose(y, expected, atol=2e-2)      # DPM-Solver++(2M), 20 steps
    z_again, y_again = teacher_ode_pairs(teacher, 256, (2,), sigma_max, sigma_max, 0.01, 20)
    assert torch.equal(z, z_again) and torch.allclose(y, y_again)     # fixed seed: a resume rebuilds the same pairs


def test_phase_schedule_runs_the_warm_ups_first():
    config = FDistillConfig(student_update_freq=2, regression_warmup_steps=3, critic_warmup_steps=2)
    method = FDistill(config, GaussianMixtureDenoiser(torch.zeros(1, 2), torch.ones(1)), MLPDenoiser(dim=2, hidden=8),
                      MLPDenoiser(dim=2, hidden=8), PixelDomain((2,)))
    assert [method.phase_at(step) for step in range(9)] == ["regression"] * 3 + ["critic"] * 3 + ["student", "critic",
                                                                                                  "student"]
    regression = next(p for p in method.phases() if p.name == "regression")
    assert regression.networks == ("student",) and regression.last_step == 2


def test_student_loss_adds_the_weighted_regression_term():
    teacher = GaussianMixtureDenoiser(torch.tensor(TWO_MODES["means"]), torch.tensor(TWO_MODES["stds"]))
    config = FDistillConfig(divergence="rkl", gan_weight=0.0, generator_sigma=5.0, regression_pairs=64)
    method = FDistill(config, teacher, MLPDenoiser(dim=2, hidden=8), MLPDenoiser(dim=2, hidden=8), PixelDomain((2,)))
    ctx = StepContext(step=1)
    (item,) = method.prepare_step("student", [{"x": torch.zeros(16, 2)}], ctx)
    torch.manual_seed(0)
    without, logs = method.loss("student", item, ctx)
    assert "student/regression" not in logs
    method.config.regression_weight = 0.5
    torch.manual_seed(0)
    with_term, logs = method.loss("student", item, ctx)
    assert logs["student/regression"] > 0.1          # a random student is far from the teacher's ODE samples
    assert (with_term - without).item() == pytest.approx(0.5 * logs["student/regression"], rel=1e-4)


def test_regression_needs_a_one_step_student():
    with pytest.raises(ValueError, match="regression_weight / regression_warmup_steps need a one-step student"):
        FDistillConfig(regression_weight=0.25, generator_sigmas=[5.0, 1.0])


def test_regression_warm_up_spreads_a_one_point_student_over_the_teachers_modes():
    # a freshly built one-step MLP student outputs ~ one point (EDM skip c_skip(5) = 1/26 of its input); 150 steps of
    # the regression warm-up must put about half its samples on each of the two modes, close to them
    torch.manual_seed(0)
    data = gaussian_mixture(**TWO_MODES, num_samples=2000)
    network = dict(dim=2, hidden=64, depth=2, sigma_data=1.0)
    config = FDistillConfig(divergence="kl", lr=1e-3, sigma_distribution="loguniform", sigma_min=0.01, sigma_max=5.0,
                            generator_sigma=5.0, sigma_data=1.0, regression_warmup_steps=150, regression_pairs=1024)
    method = FDistill(config, data.extras["denoiser"], MLPDenoiser(**network), MLPDenoiser(**network), PixelDomain((2,)))
    before = method.generate(2000, torch.Generator().manual_seed(1))
    assert (before[:, 0] > 1).float().mean() < 0.05 and (before[:, 0] < -1).float().mean() < 0.05
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, data, TrainConfig(steps=150, batch_size=128, run_dir=run_dir, device="cpu",
                                                    progress=False, export=False))
        batches = data.loader(128, seed=0)
        for step in range(150):
            trainer.train_step(step, next(batches))
    after = method.generate(2000, torch.Generator().manual_seed(1))
    right = (after[:, 0] > 0).float().mean()
    assert 0.4 < right < 0.6
    assert (after - torch.tensor([[2.0, 0.0]]) * after[:, :1].sign()).norm(dim=1).median() < 0.3
