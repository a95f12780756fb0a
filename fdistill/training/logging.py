"""Experiment tracking through accelerate's trackers: ``run_dir/metrics.jsonl`` always, wandb / tensorboard on request.

The trainer builds its ``Accelerator(log_with=[JsonlLogger(...), *trackers.log_with])``; the ``logger`` config group
builds a ``Trackers`` (which trackers, their settings, the resolved run config). Then, as in accelerate's examples:
``init_trackers`` (the flattened config and system info as hyper-parameters), ``accelerator.log`` (scalars),
``log_images`` (sample grids) and, at the end, ``finish_trackers`` (not ``end_training``: that also destroys the
process group, which callers of ``Trainer.fit`` may still use).

Scalar names: ``loss``, ``grad_norm``, ``lr`` and the method's own scalars; a method with several phases (f-distill's
critic and student) logs them per phase, ``<phase>/<name>``, so each phase has its own curve. ``eval/<metric>``
are the evaluator's numbers.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.tracking import GeneralTracker

TRACKERS = ("wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")
TENSORBOARD_DIR = "tensorboard"  # run_dir/tensorboard/<project>: the event files (``tensorboard --logdir``)
WANDB_ID_FILE = "wandb_run_id"


class JsonlLogger(GeneralTracker):
    """An accelerate tracker that appends one JSON object per ``log`` call to ``path`` (``{"step": s, **values}``);
    non-finite floats become null. The file opens (for appending) in ``start``, which accelerate calls on the main
    process only. Appending keeps the history of a resumed run in one file; ``drop_after`` removes the rows a
    resumed run redoes."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._file = None

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, values: dict[str, float], step: int | None = None, **kwargs) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def drop_after(self, step: int) -> None:
        """Keep only the rows with step <= ``step`` (a run resuming from the checkpoint of ``step`` logs the later
        steps again): the file is rewritten atomically (temporary file, fsync, rename), so a crash here loses nothing.
        A half-written last row of a killed run is dropped too."""
        reopen = self._file is not None
        if reopen:
            self._file.close()
        if self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            with temporary.open("w", encoding="utf-8") as file:
                file.write("".join(line + "\n" for line in kept))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        if reopen:
            self.start()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a row that is not complete JSON (cut by a kill)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


@dataclass
class Trackers:
    """The ``logger`` config group: accelerate trackers that run beside metrics.jsonl.

    Attributes:
        log_with: tracker names, each in ``TRACKERS`` ('wandb', 'tensorboard'), or ``GeneralTracker`` instances
            (custom trackers, as ``Accelerator(log_with=...)`` takes them); [] = metrics.jsonl only.
        project: the wandb project; tensorboard writes to ``run_dir/tensorboard/<project>``.
        mode: wandb mode: 'online', 'offline' (files under run_dir/wandb, ``wandb sync`` later) or 'disabled'.
        entity, name, tags: wandb's entity, run name (default: the run directory's name) and tags.
        config: the resolved run config (nested dict), logged as hyper-parameters with dotted keys.
    """

    log_with: list = field(default_factory=list)
    project: str = "fdistill"
    mode: str = "offline"
    entity: str | None = None
    name: str | None = None
    tags: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [t for t in self.log_with if isinstance(t, str) and t not in TRACKERS]
        if unknown:
            raise ValueError(f"logger.log_with: unknown tracker(s) {unknown}; allowed: {list(TRACKERS)}")
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {self.mode!r}")

    def names(self) -> list[str]:
        """The trackers' names ('wandb', 'tensorboard', a custom tracker's ``name``)."""
        return [t if isinstance(t, str) else t.name for t in self.log_with]

    def init_kwargs(self, run_dir: str | Path) -> dict[str, dict[str, Any]]:
        """``init_trackers(init_kwargs=...)``. wandb: the run id is kept in ``run_dir/wandb_run_id`` and
        ``resume="allow"``, so a resumed training run continues the same wandb run. Call on the main process only
        (it writes the id file)."""
        if "wandb" not in self.log_with:
            return {}
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return {"wandb": {"mode": self.mode, "entity": self.entity, "name": self.name or run_dir.name,
                          "tags": self.tags, "dir": str(run_dir), "id": run_id, "resume": "allow"}}


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as one level of dotted keys (``train.steps``: the command-line spelling) with values that
    every tracker takes as hyper-parameters (tensorboard's ``add_hparams`` refuses None, lists and dicts: those
    become strings)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def phase_scalars(logs: dict[str, float], phase: str, several_phases: bool) -> dict[str, float]:
    """The scalars of one step under their logged names: ``<phase>/<name>`` when the method has several phases
    (their losses differ in kind; one curve would zig-zag between them), unchanged otherwise."""
    return {f"{phase}/{k}": v for k, v in logs.items()} if several_phases else dict(logs)


def log_image(trackers: list[GeneralTracker], key: str, image: np.ndarray, step: int) -> None:
    """One [H, W, C] uint8 image to every tracker that shows images (tensorboard: ``add_images``; wandb: a
    ``wandb.Image``); the others (metrics.jsonl) skip it."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)


def finish_trackers(trackers: list[GeneralTracker]) -> None:
    """Close every tracker (the part of ``Accelerator.end_training`` that keeps the process group alive)."""
    for tracker in trackers:
        tracker.finish()


def parameter_counts(trained: list, all_parameters: list) -> dict[str, int]:
    """Trained and frozen parameter counts (each tensor counted once; full sizes of FSDP shards)."""
    trained_ids = {id(p) for p in trained}
    unique = {id(p): p for p in all_parameters}
    num_trained = sum(p.numel() for i, p in unique.items() if i in trained_ids)
    return {"params_trained": num_trained, "params_frozen": sum(p.numel() for p in unique.values()) - num_trained}


def format_block(title: str, info: dict[str, Any]) -> str:
    """A report (start banner, end summary): ``title`` on a rule, then one aligned ``key  value`` line per entry."""
    width = max(len(k) for k in info)
    lines = [f"  {k:<{width}}  {_readable(v)}" for k, v in info.items()]
    return "\n".join([f"{title} ".ljust(72, "-"), *lines, "-" * 72])


def format_summary(step: int, steps_run: int, seconds: float, logged: dict[str, float],
                   outputs: dict[str, Any]) -> str:
    """The end summary: the step reached (steps and seconds of this run), the last logged losses (``loss`` and
    ``<phase>/loss``) and the outputs that exist (entries that are None are left out)."""
    losses = {k: v for k, v in logged.items() if k.rsplit("/", 1)[-1] == "loss"}
    return format_block("fdistill train: done", {
        "steps": f"{step} ({steps_run} in this run, {seconds:.1f} s)", **losses,
        **{k: v for k, v in outputs.items() if v is not None}})


def _readable(value: Any) -> str:
    """Integers with thousands separators (parameter counts), floats to 4 significant digits, the rest as is."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def notice(message: str) -> None:
    """A line for the person running the job (stderr: stdout may carry results)."""
    print(f"fdistill: {message}", file=sys.stderr, flush=True)
