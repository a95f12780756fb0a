"""The 2-D f-distill benchmark's reusable pieces (``scripts/bench_fdistill_2d.py``, ``notebooks/fdistill_2d.ipynb``):
the mixture recipe, exact mode metrics, a trainer loop without checkpoints, one training run and seed summaries.

Teacher: the exact denoiser of 8 modes on a ring (weights 1..8 / 36, std 0.1, radius 2; ``data=gaussian_mixture
preset=ring8``). Student: a one-step MLP generator.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any, Callable

import torch

from fdistill.config import compose
from fdistill.data import gaussian_mixture
from fdistill.benchmarks.mixtures import mode_metrics
from fdistill.losses.fdistill import DIVERGENCES
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.training import Trainer
from fdistill.training.config import TrainConfig

COVERAGE_SHARE = 0.2      # a mode is covered when it holds >= 20 % of its true share of the samples
# The recipe without its warm start (DMD's regression loss and the regression / critic warm-ups, see FDistillConfig):
# what the mixture recipes were before it, a one-point student next to a random critic.
COLD_START = dict(regression_weight=0.0, regression_warmup_steps=0, critic_warmup_steps=0)


def recipe(divergence: str, dim: int = 2, **overrides: Any) -> FDistillConfig:
    """conf/experiment/gmm_fdistill.yaml's method (the one source of the mixture recipe: loguniform sigma in
    [0.01, 5], MLP networks, the warm start, the student at every 5th step) for ``divergence`` on ``dim``-D data,
    with ``overrides`` of FDistillConfig fields (validated again). Used by the ring8 and the random-mixture
    benchmarks."""
    composed = compose(["experiment=gmm_fdistill", f"method.divergence={divergence}", f"method.network.dim={dim}"])
    return dataclasses.replace(composed.method_config, **overrides)


def ring_mode_metrics(samples: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, std: float) -> dict:
    """``mixtures.mode_metrics`` with this benchmark's thresholds (covered at >= 20 % of the true share, precision
    within 3 std of a mode; they predate the random-mixture family's 25 % and 4 std). samples [N, 2], means [K, 2],
    weights [K], std the modes' common std."""
    return mode_metrics(samples, means, torch.full((len(means),), std), weights, covered_share=COVERAGE_SHARE,
                        precision_stds=3.0)


def run_steps(method, data, steps: int, batch_size: int, seed: int = 0,
              after_step: Callable[[int], None] | None = None) -> float:
    """``steps`` optimisation steps of the real trainer (no checkpoints or exports); returns the seconds taken by the
    steps (not by ``after_step(steps_done)``, called after every step, e.g. for evaluations during training)."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, data, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, run_dir=run_dir,
                                                    device="cpu", progress=False, export=False))
        batches = data.loader(batch_size, seed=seed)
        seconds = 0.0
        for step in range(steps):
            started = time.perf_counter()
            trainer.train_step(step, next(batches))
            seconds += time.perf_counter() - started
            if after_step is not None:
                after_step(step + 1)
        return seconds


def train_2d(divergence: str, seed: int, steps: int, batch_size: int = 256, num_eval: int = 4000,
             eval_every: int = 0):
    """Train one student; returns (method, metrics dict). With ``eval_every`` > 0 the metrics also hold
    ``trajectory``: [step, modes covered, TV, precision] every ``eval_every`` steps (same evaluation noise)."""
    torch.manual_seed(seed)
    data = gaussian_mixture(preset="ring8", dim=2, num_samples=20000, seed=seed)
    method = build(recipe(divergence), None, data)
    teacher = data.extras["denoiser"]

    def evaluate() -> dict[str, float]:
        samples = method.generate(num_eval, torch.Generator().manual_seed(1000 + seed))
        return ring_mode_metrics(samples, teacher.means, teacher.weights, float(teacher.stds[0, 0]))

    trajectory = []

    def record(step: int) -> None:
        if eval_every and step % eval_every == 0:
            m = evaluate()
            trajectory.append([step, m["modes_covered"], round(m["tv"], 4), round(m["precision"], 4)])

    seconds = run_steps(method, data, steps, batch_size, seed, after_step=record)
    return method, {**evaluate(), "seconds": seconds, **({"trajectory": trajectory} if eval_every else {})}


def summarise(runs: list[dict]) -> dict[str, float]:
    """Means over seeds, the fewest modes covered and the largest TV."""
    keys = ("modes_covered", "tv", "precision", "seconds")
    means = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    return means | {"min_modes_covered": min(r["modes_covered"] for r in runs), "max_tv": max(r["tv"] for r in runs)}


def parse_divergences(text: str) -> tuple[str, ...]:
    """``"rkl,kl,js"`` -> ("rkl", "kl", "js"); ``"all"`` -> every divergence; an unknown name is a ValueError that
    names it and the allowed ones."""
    names = DIVERGENCES if text == "all" else tuple(text.split(","))
    unknown = [name for name in names if name not in DIVERGENCES]
    if unknown:
        raise ValueError(f"unknown {unknown[0]!r}; allowed: {', '.join(DIVERGENCES)} or all")
    return names
