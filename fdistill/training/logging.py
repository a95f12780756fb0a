"""Scalar logging: always a local ``run_dir/metrics.jsonl``; optionally wandb (``logger=wandb`` group).

A logger is any object with ``log(metrics: dict[str, float], step: int)`` and ``finish()``. The ``logger`` config group
builds a factory ``make(run_dir, config) -> logger`` (Hydra ``_partial_``), so loggers see the run directory and the
resolved config as a plain dict.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

WANDB_MODES = ("online", "offline", "disabled")


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per call to ``path`` (``{"step": s, **metrics}``); non-finite floats become null.
    Appending keeps the history of a resumed run in one file; ``drop_after`` removes the rows a resumed run redoes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def drop_after(self, step: int) -> None:
        """Keep only the rows with step <= ``step`` (a run resuming from the checkpoint of ``step`` logs the later
        steps again): the file is rewritten atomically (temporary file, fsync, rename), so a crash here loses nothing.
        A half-written last row of a killed run is dropped too."""
        self._file.close()
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def finish(self) -> None:
        self._file.close()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a row that is not complete JSON (cut by a kill)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class WandbLogger:
    """Weights & Biases run. ``mode``: 'online', 'offline' (files under run_dir/wandb, sync later) or 'disabled'
    (no network, no account: what tests use). ``resume="allow"`` with a run id stored in the run directory makes a
    resumed training run continue the same wandb run."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, project: str = "fdistill",
                 entity: str | None = None, name: str | None = None, mode: str = "offline", tags: list[str] | None = None):
        import wandb

        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {mode!r}")
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self._run = wandb.init(project=project, entity=entity, name=name or run_dir.name, mode=mode, tags=tags,
                               config=config, dir=str(run_dir), id=run_id, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


class LoggerGroup:
    """Fans each call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()
