"""DDO's self-play round bookkeeping (``fdistill.methods.ddo``): the evaluators that score a target (lower is
better), class-balanced labels, drawing samples with a multi-step sampler, and the per-round table.

The rounds' history is a [rounds, len(HISTORY_COLUMNS)] float64 buffer of the method (NaN = not evaluated yet);
``round_rows`` and ``format_round_table`` turn it into the summary that ``DDO.finish`` prints and writes.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..losses.ddo import likelihood_mode
from ..samplers.config import SamplerConfig

Evaluate = Callable[[Tensor], float]
HISTORY_COLUMNS = ("start_score", "best_score", "best_step", "end_score")


def _digits_fd(data) -> Evaluate:
    from ..evaluation.digits import digits_fd

    return digits_fd


def _dataset_points(data) -> Tensor:
    """[N, D] float64: the whole dataset's samples, flattened."""
    return torch.stack([item["x"] for item in data.dataset]).flatten(1).double()


def _raw_frechet(data) -> Evaluate:
    """Frechet distance of the raw (flattened) samples to the whole dataset: two moments only (a single Gaussian with
    a mixture's mean and covariance scores 0), kept for comparison."""
    from ..evaluation.frechet import FeatureStats, fid_from_stats

    reference = FeatureStats().update(_dataset_points(data))
    return lambda samples: fid_from_stats(FeatureStats().update(samples.flatten(1).double()), reference)


def _sliced_wasserstein(data) -> Evaluate:
    """Sliced Wasserstein-1 of the raw samples to the whole dataset (``fdistill.evaluation.distribution``: 256
    directions from a fixed seed, exact 1-D W1): a distribution-level distance for low-dimensional point data."""
    from ..evaluation.distribution import sliced_wasserstein_1

    reference = _dataset_points(data)
    return lambda samples: sliced_wasserstein_1(samples, reference)


def _mode_tv(data) -> Evaluate:
    """Total variation of the samples' nearest-mode histogram to the mixture weights (blind to samples between the
    modes: a wide Gaussian split evenly between two equal modes scores 0); needs a Gaussian-mixture data source
    (``data=gaussian_mixture``: its exact denoiser in ``extras["denoiser"]`` holds the means and weights)."""
    from ..evaluation.distribution import mode_total_variation

    mixture = getattr(data, "extras", {}).get("denoiser")
    if mixture is None or not hasattr(mixture, "weights"):
        raise ValueError("method.evaluator=mode_tv needs Gaussian-mixture data (data=gaussian_mixture)")
    return lambda samples: mode_total_variation(samples, mixture.means, mixture.weights)


EVALUATORS: dict[str, Callable[[Any], Evaluate] | None] = {
    "none": None, "digits_fd": _digits_fd, "raw_frechet": _raw_frechet, "sliced_wasserstein": _sliced_wasserstein,
    "mode_tv": _mode_tv,
}


def resolve_evaluator(name: str, sample_shape: tuple[int, ...]) -> str:
    """``auto``: sliced Wasserstein for vector data (one sample is [D]), none for images; other names unchanged."""
    if name != "auto":
        return name
    return "sliced_wasserstein" if len(sample_shape) == 1 else "none"


def class_balanced_labels(num: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """[num] labels with every class equally often (counts differ by at most one), in random order."""
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=generator)]


@torch.no_grad()
def sample_with(denoiser: nn.Module, num: int, sample_shape: tuple[int, ...], sampler: SamplerConfig,
                cond: Tensor | None = None, generator: torch.Generator | None = None, batch: int = 512) -> Tensor:
    """``num`` samples [num, *sample_shape] from a denoiser with a multi-step sampler, in batches; images
    ([C, H, W]) are clamped to [-1, 1], point data is left as is."""
    from .. import samplers

    device = next(itertools.chain(denoiser.parameters(), denoiser.buffers())).device   # analytic teachers: buffers only
    schedule = samplers.noise_levels(sampler, denoiser)
    noise = torch.randn(num, *sample_shape, generator=generator) * schedule[0]    # CPU generator: same on any device
    schedule = schedule.to(device)
    chunks = []
    with likelihood_mode(denoiser):     # eval mode (no dropout), fp32
        for start in range(0, num, batch):
            chunk_cond = None if cond is None else cond[start:start + batch].to(device)
            chunks.append(samplers.sample(denoiser, noise[start:start + batch].to(device), schedule,
                                          solver=sampler.solver, cond=chunk_cond))
    samples = torch.cat(chunks)
    return samples.clamp(-1, 1) if len(sample_shape) == 3 else samples


def draw_samples(denoiser: nn.Module, num: int, sample_shape: tuple[int, ...], sampler: SamplerConfig,
                 num_classes: int, seed: int | None, batch: int) -> tuple[Tensor, Tensor | None]:
    """``num`` samples [num, *sample_shape] of ``denoiser`` and their class-balanced labels [num] (None when
    ``num_classes`` is 0), both drawn from one CPU generator seeded ``seed`` (None = the global RNG)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    labels = class_balanced_labels(num, num_classes, generator) if num_classes else None
    return sample_with(denoiser, num, sample_shape, sampler, labels, generator, batch), labels


def round_rows(history: Tensor, rounds_done: int) -> list[dict[str, Any]]:
    """Rows {'round', 'start_score', 'best_score', 'best_step', 'end_score'} of the first ``rounds_done`` rounds of
    the history buffer [rounds, len(HISTORY_COLUMNS)] (NaN becomes None)."""
    rows = []
    for r in range(rounds_done):
        values = [None if math.isnan(v) else v for v in history[r].tolist()]
        rows.append({"round": r, **dict(zip(HISTORY_COLUMNS, values))})
    return rows


def format_round_table(summary: dict[str, Any]) -> str:
    """Markdown table of ``DDO.round_summary()``."""
    lines = [f"| round | start {summary['evaluator']} | best | best step | end |", "|---|---|---|---|---|"]
    for row in summary["rounds"]:
        cells = ["-" if v is None else f"{v:.4g}" for v in (row[c] for c in HISTORY_COLUMNS)]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(summary: dict[str, Any], path: str) -> None:
    """Write the round summary as indented JSON, creating the parent directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2))
