"""DDO's self-play round bookkeeping (``fdistill.methods.ddo``): the evaluators that score a target (lower is
better), class-balanced labels, drawing samples with a multi-step sampler, and the per-round table.

The rounds' history is a [rounds, len(HISTORY_COLUMNS)] float64 buffer of the method (NaN = not evaluated yet);
``round_rows`` and ``format_round_table`` turn it into the summary that ``DDO.finish`` prints and writes.
"""
from __future__ import annotations

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


def _raw_frechet(data) -> Evaluate:
    """Frechet distance of the raw (flattened) samples to the whole dataset: meaningful for low-dimensional point
    data such as Gaussian mixtures."""
    from ..evaluation.frechet import FeatureStats, fid_from_stats

    reference = FeatureStats().update(torch.stack([item["x"] for item in data.dataset]).flatten(1).double())
    return lambda samples: fid_from_stats(FeatureStats().update(samples.flatten(1).double()), reference)


EVALUATORS: dict[str, Callable[[Any], Evaluate] | None] = {
    "none": None, "digits_fd": _digits_fd, "raw_frechet": _raw_frechet,
}


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

    device = next(denoiser.parameters()).device
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
