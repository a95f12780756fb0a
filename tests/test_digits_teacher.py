"""The trained digits teacher shipped in fdistill/assets/digits_teacher, the experiment that distils it
(digits_fdistill_learned), and the main job (digits_fdistill), which keeps the exact teacher."""
import json

import torch

from fdistill.config import build_run, compose
from fdistill.denoisers import EmpiricalDenoiser
from fdistill.evaluation.digits import digits_images
from fdistill.networks import DIGITS_TEACHER_DIR, digits_teacher


def test_shipped_teacher_loads_frozen_and_matches_its_record():
    teacher = digits_teacher()
    assert teacher.num_classes == 10 and tuple(teacher.sample_shape) == (1, 8, 8)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    record = json.loads((DIGITS_TEACHER_DIR / "record.json").read_text())
    assert record["parameters"] == sum(p.numel() for p in teacher.parameters())
    weight_bytes = sum(path.stat().st_size for path in DIGITS_TEACHER_DIR.rglob("*.safetensors"))
    assert weight_bytes == record["weight_bytes"] < 1_000_000


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


def test_learned_experiment_distils_the_shipped_teacher_starting_from_its_weights():
    spec = compose(["experiment=digits_fdistill_learned"])
    assert spec.cfg.model._target_ == "fdistill.networks.digits_teacher"
    method = build_run(spec, with_loggers=False).method
    shipped = digits_teacher().state_dict()
    for network in (method.frozen["teacher"], method.networks["student"], method.networks["fake_score"]):
        state = network.state_dict()
        assert state.keys() == shipped.keys() and all(torch.equal(state[k], shipped[k]) for k in shipped)


def test_main_job_keeps_the_exact_teacher():
    spec = compose(["experiment=digits_fdistill"])
    assert spec.train.steps == 6000
    method = build_run(spec, with_loggers=False).method
    assert isinstance(method.frozen["teacher"], EmpiricalDenoiser)
    assert sum(p.numel() for p in method.networks["student"].parameters()) > 0
