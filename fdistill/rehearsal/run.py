"""One rehearsal: build a recipe at real size, run trainer steps (and the bare DPO loop), measure time and memory;
in a subprocess of its own; the markdown table; ``python -m fdistill.rehearsal`` (``main``)."""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .bare_dpo import BareDPOLoop
from .memory import GIB, PeakMemory, analytic_memory, resident_gib, tensor_bytes, trained_parameters
from .recipes import COMPONENT_BUILDERS, REHEARSALS, Rehearsal, compose_rehearsal


def step_window(method, steps: int, search: int = 64) -> list[int]:
    """``steps`` consecutive step indices, the earliest window that runs the most distinct phases (f-distill with
    a student every 5th step and 3 steps: [2, 3, 4] = critic, critic, student)."""
    def distinct(start: int) -> int:
        return len({method.phase_at(start + k) for k in range(steps)})

    start = max(range(search), key=lambda s: (distinct(s), -s))
    return list(range(start, start + steps))


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``; CPU seconds hardly depend on other processes
    sharing the cores, wall seconds do."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def import_libraries() -> None:
    """Load the model classes the rehearsals use (Diffusers and transformers load them lazily), so the resident
    size measured before building counts the libraries' code and not the run's memory."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import (AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel,  # noqa: F401
                           UNet2DModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from .. import config, training  # noqa: F401


# ----------------------------------------------------------------------------------------------- one rehearsal

@dataclass
class RehearsalResult:
    """One row of the table (memory in GiB, times in seconds; ``ratio`` = (peak - runtime) / analytic).
    ``resident_before_gib``: memory when the steps start (weights built, no optimizer state yet).
    ``trainer_over_bare``: throughput of the trainer relative to the bare loop (bare seconds / trainer seconds,
    CPU seconds on CPU)."""

    name: str
    experiment: str
    architecture: str
    device: str
    status: str = "ok"
    batch: int = 0
    resolution: int = 0
    steps: list[int] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    mixed_precision: str = "no"
    frozen_dtype: str | None = None
    compile: bool = False
    trained_params: int = 0
    frozen_params: int = 0
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    seconds_per_step: float = math.nan
    cpu_seconds_per_step: float = math.nan
    resident_before_gib: float = math.nan
    peak_gib: float = math.nan
    runtime_gib: float = 0.0
    analytic: dict[str, float] = field(default_factory=dict)
    analytic_gib: float = math.nan
    ratio: float = math.nan
    bare_step_seconds: list[float] = field(default_factory=list)
    bare_step_cpu_seconds: list[float] = field(default_factory=list)
    trainer_over_bare: float = math.nan
    losses: list[float] = field(default_factory=list)


def steady_seconds(times: list[float]) -> float:
    """Median time of the steps after the first (which allocates optimizer states and, in DDO, draws the fakes)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def rehearse(row: Rehearsal, steps: int = 3, batch: int = 2, device: str = "cpu", resolution: int = 64,
             compile_networks: bool = False, bare: bool = False, frozen_dtype: str | None = None) -> RehearsalResult:
    """Build ``row`` at real size and run ``steps`` trainer steps (interleaved with as many bare-loop steps when
    ``bare``, a DPO row only); see the module docstring for what is measured. ``frozen_dtype`` replaces the
    recipe's dtype of the frozen SD parts (the recipes' float16 fails on CPU: see benchmarks/rehearsal_cpu.md)."""
    from ..config import build_run
    from ..training import Trainer

    torch_device = torch.device(device)
    import_libraries()
    gc.collect()
    runtime = resident_gib() if torch_device.type == "cpu" else 0.0
    result = RehearsalResult(row.name, row.experiment, row.architecture, device, batch=batch, resolution=resolution,
                             compile=compile_networks, runtime_gib=runtime)
    with tempfile.TemporaryDirectory() as run_dir:
        spec = compose_rehearsal(row, steps, batch, device, resolution, run_dir, compile_networks, frozen_dtype)
        run = build_run(spec, with_loggers=False)
        trainer = Trainer(run.method, run.data, spec.train)
        window = step_window(run.method, steps)
        batches = run.data.loader(spec.train.batch_size, seed=spec.train.seed, start_step=window[0])
        bare_loop = BareDPOLoop(run.method, dict(bf16=torch.bfloat16, fp16=torch.float16).get(
            spec.train.mixed_precision), torch_device) if bare else None
        run.method.train()                      # as Trainer.fit does before its loop
        memory = PeakMemory(torch_device)
        memory.reset()
        result.resident_before_gib = memory.current_gib()
        for index, step in enumerate(window):
            item = next(batches)
            logs: dict[str, float] = {}
            runs = [(lambda: logs.update(trainer.train_step(step, item)), result.step_seconds, result.step_cpu_seconds)]
            if bare_loop is not None:   # alternate which goes first: neither always runs on a warmer cache
                runs.insert(index % 2, (lambda: bare_loop.step(item), result.bare_step_seconds,
                                        result.bare_step_cpu_seconds))
            for fn, wall_times, cpu_times in runs:
                wall, cpu = _timed(fn, torch_device)
                wall_times.append(wall)
                cpu_times.append(cpu)
            result.losses.append(logs["loss"])
        result.peak_gib = memory.peak_gib()
        analytic = analytic_memory(trainer)
        trained = trained_parameters(trainer)
        result.steps, result.phases = window, [run.method.phase_at(s) for s in window]
        result.mixed_precision = spec.train.mixed_precision
        result.frozen_dtype = spec.cfg.model.get("torch_dtype")
        result.trained_params = sum(p.numel() for p, _ in trained.values())
        result.frozen_params = sum(p.numel() for p in run.method.parameters() if id(p) not in trained)
    result.analytic = {k: v / GIB for k, v in asdict(analytic).items()}
    result.analytic_gib = analytic.total / GIB
    result.seconds_per_step = steady_seconds(result.step_seconds)
    result.cpu_seconds_per_step = steady_seconds(result.step_cpu_seconds)
    result.ratio = (result.peak_gib - runtime) / result.analytic_gib
    if bare:
        on_cpu = torch_device.type == "cpu"
        bare_times = result.bare_step_cpu_seconds if on_cpu else result.bare_step_seconds
        trainer_times = result.step_cpu_seconds if on_cpu else result.step_seconds
        result.trainer_over_bare = steady_seconds(bare_times) / steady_seconds(trainer_times)
    return result


def estimate_gib(row: Rehearsal, resolution: int = 64, frozen_dtype: str | None = None) -> float:
    """The analytic minimum estimated before building anything: the recipe's networks built on the meta device
    (no memory), counted as ``trained_copies`` trained (fp32 weights, gradients, optimizer states, EMA copies) and
    ``frozen_copies`` frozen copies of the main network, plus the other components in their dtype."""
    from hydra.utils import instantiate

    from ..architectures import network_from_config

    spec = compose_rehearsal(row, 1, 1, "cpu", resolution, "unused", frozen_dtype=frozen_dtype)
    with torch.device("meta"):
        model = (instantiate(spec.cfg.model, _convert_="all") if row.architecture in COMPONENT_BUILDERS
                 else network_from_config(row.architecture))
    main = getattr(model, "unet", model)
    others = [module for module in vars(model).values() if isinstance(module, nn.Module) and module is not main]
    main_params = sum(p.numel() for p in main.parameters())
    optimizer = getattr(spec.method_config, "optimizer", "adamw")
    per_trained = 4 + 4 + (8 if optimizer != "adafactor" else 0) + 4 * len(spec.train.ema_decays)
    other_bytes = sum(tensor_bytes(p) for module in others for p in module.parameters())
    return (main_params * (row.trained_copies * per_trained + row.frozen_copies * 4) + other_bytes) / GIB


def rehearse_in_subprocess(row: Rehearsal, timeout: float | None = None, **options) -> RehearsalResult:
    """``rehearse`` in a fresh interpreter (``python -m fdistill.rehearsal``): a peak of its own; a failure becomes
    the row's status (its last error line)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "result.json"
        command = [sys.executable, "-m", __package__, row.name, "--json", str(path)]
        for key, value in options.items():
            if value is True:
                command.append(f"--{key.replace('_', '-')}")
            elif value is not False:
                command += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 and path.is_file():
            return RehearsalResult(**json.loads(path.read_text()))
    error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return RehearsalResult(row.name, row.experiment, row.architecture, options.get("device", "cpu"),
                           status=f"failed: {error}")


# ----------------------------------------------------------------------------------------------- table

def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def format_table(results: list[RehearsalResult]) -> str:
    """A markdown table of rehearsal rows (memory in GiB; seconds per step after the first step)."""
    lines = ["| recipe | trained params | frozen params | s/step wall | s/step CPU | peak | runtime | analytic trained "
             "(weights + grads + opt + EMA) | analytic frozen | analytic total | (peak - runtime) / analytic | "
             "trainer/bare | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        trained = sum(r.analytic.get(k, 0.0) for k in ("trained_weights", "gradients", "optimizer_states", "ema"))
        cells = [r.name + (" (compiled)" if r.compile else ""), f"{r.trained_params:,}", f"{r.frozen_params:,}",
                 _number(r.seconds_per_step),
                 _number(r.cpu_seconds_per_step), _number(r.peak_gib), _number(r.runtime_gib),
                 _number(trained if r.analytic else math.nan), _number(r.analytic.get("frozen", math.nan)),
                 _number(r.analytic_gib), _number(r.ratio), _number(r.trainer_over_bare), r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill.rehearsal", description="one rehearsal row as JSON")
    parser.add_argument("name", choices=sorted(REHEARSALS))
    parser.add_argument("--json", required=True, help="where to write the row")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--compile-networks", action="store_true")
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--frozen-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    result = rehearse(REHEARSALS[args.name], args.steps, args.batch, args.device, args.resolution,
                      args.compile_networks, args.bare, args.frozen_dtype)
    Path(args.json).write_text(json.dumps(asdict(result)))
    return 0

