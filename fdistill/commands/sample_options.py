"""Command-line options shared by ``fdistill sample``, ``fdistill fid`` and ``fdistill clipscore``: the prompt file
and the sampler (solver, steps, noise-level schedule), each defined once here."""
from __future__ import annotations

import argparse

from fdistill.commands import bounded_int, finite_float
from fdistill.evaluation.clip import CLIP_MODEL, CLIP_PRETRAINED
from fdistill.evaluation.prompts import DEFAULT_CAPTION_COLUMN

MAX_NUM = 10_000_000             # images are written / streamed batch by batch: the bound only catches typos (1e12)
MAX_STEPS = 1000                 # a training schedule's length; more steps only cost time
MAX_BATCH = 65_536


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompts, --caption-column, --per-prompt (shared with ``fdistill fid`` and ``fdistill clipscore``)."""
    parser.add_argument("--prompts", default=None,
                        help="prompt file, one image per prompt: .txt lines, .json/.jsonl strings or objects, .parquet")
    parser.add_argument("--caption-column", default=DEFAULT_CAPTION_COLUMN,
                        help="field / column holding the prompt in a .json, .jsonl or .parquet --prompts file")
    parser.add_argument("--per-prompt", type=bounded_int(1, MAX_NUM), default=1, help="images per --prompts prompt")


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """--clip-model, --clip-pretrained (shared by ``fdistill fid --features clip`` and ``fdistill clipscore``)."""
    parser.add_argument("--clip-model", default=CLIP_MODEL, help="open_clip model name, local-dir:PATH or hf-hub:ID")
    parser.add_argument("--clip-pretrained", default=CLIP_PRETRAINED, help="open_clip pretrained tag or weights file")


def add_sampler_arguments(parser: argparse.ArgumentParser, solver: str | None, steps: int | None,
                          solver_help: str, steps_help: str, guidance_help: str) -> None:
    """--solver (fdistill.samplers.SOLVERS), --steps (1 .. MAX_STEPS) with the command's own defaults and help, and
    --schedule (SIGMA_SCHEDULES) and --guidance (>= 0) whose defaults are SamplerConfig's."""
    from fdistill.samplers import SIGMA_SCHEDULES, SOLVERS, SamplerConfig

    parser.add_argument("--solver", choices=list(SOLVERS), default=solver, help=solver_help)
    parser.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=steps, help=steps_help)
    parser.add_argument("--schedule", choices=list(SIGMA_SCHEDULES), default=SamplerConfig.schedule,
                        help="noise-level spacing")
    parser.add_argument("--guidance", type=finite_float, default=SamplerConfig.guidance, help=guidance_help)
