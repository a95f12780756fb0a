"""The trained digits teacher shipped in fdistill/assets/digits_teacher, the main job that distils it
(digits_fdistill, what `fdistill distill` runs), and the benchmarks' exact-teacher recipe (digits_fdistill_exact)."""
import json

import pytest
import torch

from fdistill.commands.distill import EVAL_SAMPLES, balanced_digit_metrics, teacher_samples
from fdistill.config import build_run, compose
from fdistill.denoisers import EmpiricalDenoiser
from fdistill.evaluation.digits import digits_images
from fdistill.networks import DIGITS_TEACHER_DIR, digits_small_unet, digits_teacher


def shipped_record() -> dict:
    return json.loads((DIGITS_TEACHER_DIR / "record.json").read_text())


def test_shipped_teacher_is_a_frozen_digits_small_unet_matching_its_record():
    teacher = digits_teacher()
    assert teacher.num_classes == 10 and tuple(teacher.sample_shape) == (1, 8, 8)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert tuple(teacher.net.config.block_out_channels) == digits_small_unet().net.config.block_out_channels == (16, 32)
    record = shipped_record()
    assert record["parameters"] == sum(p.numel() for p in teacher.parameters()) == 177_553
    weight_bytes = sum(path.stat().st_size for path in DIGITS_TEACHER_DIR.rglob("*.safetensors"))
    assert weight_bytes == record["weight_bytes"] < 1_000_000
    assert "model=digits_small_unet" in record["command"] and f"train.steps={record['steps']}" in record["command"]


def test_shipped_teacher_denoises_digits_better_than_their_class_means():
    """Trained weights: at sigma = 0.5 its x0 error on the digits is well below that of each image's class mean
    (the best denoiser that ignores the noisy image)."""
    images, labels = digits_images()
    class_means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    sigma = torch.full((len(images),), 0.5)
    noisy = images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher_error = (digits_teacher()(noisy, sigma, labels) - images).square().mean()
    class_mean_error = (class_means[labels] - images).square().mean()
    assert teacher_error < 0.5 * class_mean_error


def test_shipped_teacher_digits_fd_matches_its_record():
    """Re-measured as record.json was (2,000 class-balanced DPM-Solver++(2M) samples, 20 steps, seed 2), through the
    main job's method: the same FD up to float differences between CPUs, and below the main job's FD goal of 4."""
    torch.manual_seed(0)
    method = build_run(compose(["experiment=digits_fdistill"]), with_loggers=False).method
    measured = balanced_digit_metrics(teacher_samples(method, EVAL_SAMPLES, torch.Generator().manual_seed(2)))
    recorded = shipped_record()["teacher_dpmpp_2m_20_steps"]
    assert measured["digits_fd"] == pytest.approx(recorded["digits_fd"], rel=0.02)
    assert measured["within_class_std"] == pytest.approx(recorded["within_class_std"], rel=0.02)
    assert recorded["digits_fd"] < 4


def test_main_job_distils_the_shipped_teacher_starting_from_its_weights():
    spec = compose(["experiment=digits_fdistill"])
    assert spec.cfg.model._target_ == "fdistill.networks.digits_teacher"
    assert spec.method_config.divergence == "js" and spec.method_config.generator_sigma == 80.0
    assert spec.method_config.features == "teacher" and spec.train.steps == 2000
    assert spec.method_config.regression_weight == 0.25                   # DMD's regression onto the teacher's ODE map
    method = build_run(spec, with_loggers=False).method
    shipped = digits_teacher().state_dict()
    for network in (method.frozen["teacher"], method.networks["student"], method.networks["fake_score"]):
        state = network.state_dict()
        assert state.keys() == shipped.keys() and all(torch.equal(state[k], shipped[k]) for k in shipped)


def test_exact_recipe_keeps_the_exact_teacher_and_a_student_from_scratch():
    spec = compose(["experiment=digits_fdistill_exact"])
    assert spec.train.steps == 6000
    method = build_run(spec, with_loggers=False).method
    assert isinstance(method.frozen["teacher"], EmpiricalDenoiser)
    assert sum(p.numel() for p in method.networks["student"].parameters()) == 41_961      # tiny_unet
