"""``fdistill distill [overrides]``: f-distill a one-step generator; = ``fdistill train experiment=digits_fdistill``.

With no arguments this is the README's main job: distil the trained class-conditional digits teacher shipped in the
package (``fdistill/assets/digits_teacher``) into a one-step generator that starts from its weights, with the
Jensen-Shannon divergence, on CPU, in minutes. It writes
into ``train.run_dir`` (default ``runs/digits_fdistill``):
    model/            the one-step generator (``fdistill sample --model <dir> --steps 1``; Diffusers loads model/unet)
    samples/          sample grids of the generator
    metrics.json      digits FD, class-histogram TV and within-class spread of the generator and of the teacher
                      (DPM-Solver++(2M), 20 steps)
    metrics.jsonl     training scalars; config.yaml; checkpoints/

Examples:
    fdistill distill
    fdistill distill method.divergence=rkl train.steps=500 train.run_dir=runs/digits_rkl
    fdistill distill experiment=digits_fdistill_exact                   # the exact teacher, student from scratch
    fdistill distill experiment=gmm_fdistill
    fdistill distill -m method.divergence=rkl,kl,js train.steps=500     # a sweep: one run dir per divergence
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .train import run_training

DEFAULT_EXPERIMENT = "digits_fdistill"
EVAL_SAMPLES = 2000

USAGE = """usage: fdistill distill [KEY=VALUE ...]   (Hydra overrides on top of experiment=digits_fdistill)

Distils a one-step generator with f-distill. Without arguments: the built-in digits, the shipped trained teacher,
Jensen-Shannon, CPU. Common keys: method.divergence (rkl kl js sf sh jf neyman), train.steps, train.run_dir,
experiment=<name>.
Writes run_dir/model (one-step generator), run_dir/samples, run_dir/metrics.json."""


def with_default_experiment(argv: list[str]) -> list[str]:
    """Prepend ``experiment=digits_fdistill`` unless an experiment is chosen."""
    chosen = any(arg.split("=", 1)[0].lstrip("+~") == "experiment" for arg in argv)
    return list(argv) if chosen else [f"experiment={DEFAULT_EXPERIMENT}", *argv]


def as_digit_images(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, R, R] images in [-1, 1] at the digits' native 8x8 (area downsampling for R = 16, 32)."""
    return images if images.shape[-1] == 8 else F.adaptive_avg_pool2d(images, 8)


def digit_metrics(images: torch.Tensor, class_frequencies: torch.Tensor) -> dict[str, float]:
    """digits FD and the TV distance of the predicted-class histogram to the data's class frequencies."""
    from ..evaluation import digits_class_histogram, digits_fd

    images = as_digit_images(images.float().clamp(-1, 1))
    histogram = digits_class_histogram(images)
    return {"digits_fd": digits_fd(images), "class_tv": float(0.5 * (histogram - class_frequencies).abs().sum())}


def within_class_spread(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean per-pixel standard deviation of that class's images ([N, ...], [N] -> float).
    The digits' own is 0.33; a class-conditional generator that ignores its noise scores 0."""
    return float(torch.stack([images[labels == c].float().std(0).mean() for c in labels.unique()]).mean())


def balanced_digit_metrics(images: torch.Tensor) -> dict[str, float]:
    """digit_metrics against uniform class frequencies, and the within-class spread, of class-balanced samples
    [N, C, H, W] whose labels cycle 0..9 (as ``method.generate`` and ``teacher_samples`` draw them)."""
    labels = torch.arange(len(images)) % 10
    images = images.cpu()
    return {**digit_metrics(images, torch.full((10,), 0.1, dtype=torch.float64)),
            "within_class_std": within_class_spread(images, labels)}


def teacher_samples(method, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` samples of the (guided) teacher with the default sampler (SamplerConfig: DPM-Solver++(2M), 20 Karras
    steps) over the method's sigma range."""
    from ..samplers import SamplerConfig, noise_levels, sample

    config = method.config
    sampler = SamplerConfig(sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    levels = noise_levels(sampler, method.frozen["teacher"])
    noise = levels[0] * torch.randn(num, *method.sample_shape, generator=generator, dtype=torch.float64)
    cond = torch.arange(num) % method.num_classes if method.num_classes else None
    device = method.device()     # noise drawn on the CPU: the same samples on any device
    with torch.no_grad():
        return sample(method.guided_teacher, noise.float().to(device), levels.float().to(device), solver=sampler.solver,
                      cond=None if cond is None else cond.to(device))


def evaluate_digits(method, data, num: int = EVAL_SAMPLES) -> dict[str, Any]:
    """Metrics of the one- or few-step generator and of the teacher against the digits (class-balanced samples)."""
    started = time.perf_counter()
    student = balanced_digit_metrics(method.generate(num, torch.Generator().manual_seed(1)))
    student_seconds = time.perf_counter() - started
    started = time.perf_counter()
    teacher = balanced_digit_metrics(teacher_samples(method, num, torch.Generator().manual_seed(2)))
    from ..samplers import SamplerConfig

    return {"samples": num, "student": {**student, "nfe": len(method.generator_sigmas), "seconds": student_seconds},
            "teacher": {**teacher, "nfe": SamplerConfig.steps, "solver": SamplerConfig.solver,
                        "seconds": time.perf_counter() - started}}


def main(argv: list[str]) -> int:
    from .hydra_habits import run_command

    return run_command("distill", argv, USAGE, distill_once, preset=with_default_experiment)


def distill_once(overrides: list[str]) -> int:
    """Train one f-distill run from full overrides, then evaluate and write ``metrics.json``; the exit code."""
    started = time.perf_counter()
    code, trainer, spec, run = run_training("distill", overrides, method_name="fdistill")
    if code or not trainer.is_main:
        return code
    metrics: dict[str, Any] = {"divergence": spec.method_config.divergence, "steps": spec.train.steps,
                               "train_seconds": time.perf_counter() - started}
    if str(getattr(run.data, "name", "")).startswith("digits"):
        with trainer.ema.swapped_in():
            metrics.update(evaluate_digits(run.method.eval(), run.data))
    path = Path(trainer.run_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"fdistill distill: generator in {trainer.run_dir / 'model'}, metrics in {path}")
    return 0
