"""Which checkpoint a run resumes from (verified, with fallback), and the resume guard on run-defining settings.

Run-defining settings decide what a training step computes; a run resumed with other values is not the run its
checkpoints belong to, so resuming refuses (ResumeConflict, listing each key as ``old -> new``) unless
``train.resume=force``, which applies the new values (the trainer re-applies optimizer settings such as the LR after
loading the optimizer state). They are:
    method.*, model.*, data.*, sampler.* (DDO draws its fakes with the sampler),
    train.batch_size (global), train.mixed_precision, train.seed, train.ema_decays, train.ema_warmup_steps,
    train.lr_warmup_steps.
Everything else may change on resume: train.steps (a run is extended by raising it), the cadence of checkpoints,
logs, sample grids and evaluation (checkpoint_every, log_every, sample_every, eval_every, keep_last, num_samples),
where and how it runs (run_dir, resume, device, num_workers, progress, micro_batches, fsdp, fsdp_min_params: a run
resumes on another process count, which changes micro_batches for the same global batch, and with or without
FSDP), export, and the eval / logger groups.
A run built in Python without a resolved config (``Trainer(run_config=None)``) guards the train keys above and
each phase's optimizer settings (``method.phases.<phase>.<field>``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import CheckpointError, checkpoint_problem, step_directories
from .config import RESUME_MODES
from .manifest import read_manifest
RUN_DEFINING_SECTIONS = ("method", "model", "data", "sampler")
RUN_DEFINING_TRAIN_KEYS = ("batch_size", "mixed_precision", "seed", "ema_decays", "ema_warmup_steps",
                           "lr_warmup_steps")
DAMAGED_PREFIX = "damaged-"


class ResumeConflict(ValueError):
    """The checkpoint was written with other run-defining settings; the message lists them (old -> new)."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ({'a': {'b': 1}} -> {'a.b': 1}); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_defining_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run-defining entries (see the module docstring) of a resolved run config, flattened to dotted keys and
    normalised through JSON (tuples become lists), as a checkpoint manifest stores them."""
    train_keys = {f"train.{key}" for key in RUN_DEFINING_TRAIN_KEYS}
    chosen = {key: value for key, value in flatten(config).items()
              if key.split(".", 1)[0] in RUN_DEFINING_SECTIONS or key in train_keys}
    return json.loads(json.dumps(chosen, sort_keys=True, default=repr))


def setting_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for each key whose value differs (or that only one side has), sorted by key."""
    absent = object()
    show = lambda value: "(absent)" if value is absent else json.dumps(value)   # noqa: E731
    return [f"{key}: {show(old.get(key, absent))} -> {show(new.get(key, absent))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, absent) != new.get(key, absent)]


@dataclass
class ResumePlan:
    """The checkpoint to resume from (None: start at step 0) and what the run should say about the choice."""

    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


def guard_settings(checkpoint: Path, settings: Mapping[str, Any], force: bool) -> list[str]:
    """Compare the checkpoint's recorded run-defining settings with the current ones: ResumeConflict unless
    ``force``; with ``force`` the notes that say which new values apply."""
    recorded = read_manifest(checkpoint).get("config")
    changes = [] if recorded is None else setting_changes(recorded, settings)
    if changes and not force:
        raise ResumeConflict(f"checkpoint {checkpoint} was written with other run-defining settings: "
                             f"{'; '.join(changes)}; set train.resume=force to resume with the new values, or "
                             f"use another train.run_dir")
    return [f"train.resume=force: resuming with changed settings: {'; '.join(changes)}"] if changes else []


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step_*`` (kept for inspection, ignored by resume and rotation)."""
    target = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
    if target.exists():
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, target)
    return target


def plan_resume(root: Path, resume: str, settings: Mapping[str, Any]) -> ResumePlan:
    """Pick the checkpoint to resume from under ``root`` (``run_dir/checkpoints``) per ``train.resume``.

    'auto' / 'force': the newest checkpoint whose files match its manifest; newer damaged ones are set aside and
    named with what is wrong. Checkpoints that exist but of which none is intact: CheckpointError naming each (a run
    never silently starts over on top of them; ``train.resume=never`` does that knowingly). A directory: that
    checkpoint, which must be intact. Then the resume guard (``guard_settings``)."""
    if resume == "never":
        return ResumePlan(None)
    if resume not in RESUME_MODES:
        directory = Path(resume)
        problem = checkpoint_problem(directory)
        if problem is not None:
            raise CheckpointError(f"train.resume={resume}: cannot resume from it: {problem}")
        return ResumePlan(directory, guard_settings(directory, settings, force=False))
    damaged: list[tuple[Path, str]] = []
    for _, directory in reversed(step_directories(root)):   # every one: those without a manifest count as damaged
        problem = checkpoint_problem(directory)
        if problem is None:
            break
        damaged.append((directory, problem))
    else:
        if damaged:
            listing = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
            raise CheckpointError(f"no checkpoint in {root} can be resumed ({listing}); restore one, or start over "
                                  f"with train.resume=never (metrics.jsonl restarts and old checkpoints rotate away)")
        return ResumePlan(None)
    notes = guard_settings(directory, settings, force=resume == "force")
    for path, problem in damaged:
        notes.append(f"checkpoint {path.name} is damaged ({problem}): moved to {set_aside(path).name}; "
                     f"resuming from the newest intact checkpoint, {directory.name}")
    return ResumePlan(directory, notes)
