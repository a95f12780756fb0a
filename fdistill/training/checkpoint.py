"""Atomic, rotating checkpoints: ``run_dir/checkpoints/step_XXXXXX/``.

Layout of one checkpoint:
    model.safetensors          method.checkpoint_state_dict() (everything but the frozen networks)
    ema_<decay>.safetensors    one per EMA decay
    trainer_state.pt           step, optimizer / LR-scheduler / loss-scaler states, EMA update count, RNG state:
                               plain containers of tensors and numbers, loaded with ``weights_only=True``
    manifest.json              size and SHA-256 of each file above, run-defining settings (``manifest.py``)
A checkpoint is written into a hidden temporary directory, the manifest last, every file fsync'ed, then renamed
into place: a crash at any point leaves either the complete new checkpoint or none. A write that fails (disk full)
removes its temporary directory and raises CheckpointError naming the directory; the previous checkpoints are
untouched. Deleting (rotation, replacing a step) first renames the directory to a hidden ``.trash-*`` name, so a
kill mid-deletion never leaves a half-deleted ``step_*`` directory; leftovers of either kind are removed on the next
start. Weights never go through pickle; nothing is unpickled beyond tensors and plain containers.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .manifest import MANIFEST, read_manifest, verify_files, write_manifest

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
REQUIRED_FILES = (MODEL_FILE, TRAINER_STATE)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of the existing ones can be resumed; the message names them."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def ema_file(decay: float) -> str:
    return f"ema_{decay:g}.safetensors"


def _fsync(path: Path) -> None:
    """Flush a file's or directory's data to disk (directories: so that renames inside them are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies (safetensors refuses shared or non-contiguous storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a manifest, which is written last) under ``root`` (``run_dir/checkpoints``),
    sorted by step. Complete is not intact: ``checkpoint_problem`` verifies the files."""
    return sorted((step, p) for step, p in step_directories(root) if (p / MANIFEST).is_file())


def step_directories(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory under ``root``, complete or not, sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    matches = ((CHECKPOINT_PATTERN.match(p.name), p) for p in root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in matches if m and p.is_dir())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_problem(directory: Path) -> str | None:
    """None when ``directory`` is an intact checkpoint (its manifest lists the model and trainer state, and every
    listed file matches its size and SHA-256); else what is wrong, in a few words."""
    try:
        manifest = read_manifest(directory)
    except ValueError as error:
        return str(error)
    missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if missing:
        return f"{MANIFEST} does not list {missing[0]}"
    return verify_files(directory, manifest)


def save_checkpoint(root: str | Path, step: int, model: dict[str, Tensor], emas: dict[float, dict[str, Tensor]],
                    trainer_state: dict[str, Any], keep_last: int, config: dict[str, Any] | None = None,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` (``config``: run-defining settings for its manifest),
    then delete all but the newest ``keep_last`` and those in ``protect``. Raises CheckpointError when a file
    cannot be written (disk full, permissions), after removing the partial temporary directory."""
    root = Path(root)
    final = root / checkpoint_name(step)
    temporary = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        save_file(_plain_tensors(model), temporary / MODEL_FILE)
        for decay, tensors in emas.items():
            save_file(_plain_tensors(tensors), temporary / ema_file(decay))
        torch.save(trainer_state, temporary / TRAINER_STATE)
        write_manifest(temporary, step, config)
        for path in temporary.iterdir():
            _fsync(path)
        _fsync(temporary)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(f"cannot write checkpoint {final.name} in {root}: {error}; the previous checkpoint "
                              f"({previous or 'none'}) is intact and a rerun resumes from it") from error
    if final.exists():  # the same step written again (a run restarted with resume=never, or past a damaged one)
        discard(final)
    os.rename(temporary, final)
    _fsync(root)
    rotate_checkpoints(root, keep_last, protect)
    return final


def discard(path: Path) -> None:
    """Delete a checkpoint directory: rename it to a hidden trash name first (atomic), so that a kill while
    deleting leaves a ``.trash-*`` directory to clean up, never a half-deleted ``step_*`` one."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def rotate_checkpoints(root: str | Path, keep_last: int, protect: tuple[Path, ...] = ()) -> None:
    """Delete all complete checkpoints but the newest ``keep_last`` and those in ``protect``."""
    keep = {Path(p).name for p in protect}
    for _, path in list_checkpoints(root)[:-keep_last]:
        if path.name not in keep:
            discard(path)


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete what writes and deletions cut short left behind: hidden temporaries and trash (silently), and
    ``step_*`` directories with neither a manifest nor a trainer state (an interrupted deletion by an earlier
    version, a partial copy); returns the latter, for the caller to report. A directory with a trainer state but no
    manifest may be a complete checkpoint of an earlier version: it is kept (resume reports it as unverifiable)."""
    root = Path(root)
    if not root.is_dir():
        return []
    for path in [*root.glob(".tmp-step_*"), *root.glob(".trash-step_*")]:
        shutil.rmtree(path, ignore_errors=True)
    partial = [path for _, path in step_directories(root)
               if not (path / MANIFEST).is_file() and not (path / TRAINER_STATE).is_file()]
    for path in partial:
        discard(path)
    return partial


def load_checkpoint(directory: str | Path, ema_decays: list[float]) -> tuple[dict[str, Tensor], dict[float, dict[str, Tensor]], dict[str, Any]]:
    """(model tensors, {decay: EMA tensors}, trainer state) of one checkpoint directory; tensors on the CPU."""
    directory = Path(directory)
    if not (directory / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {TRAINER_STATE})")
    emas = {}
    for decay in ema_decays:
        path = directory / ema_file(decay)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no EMA file for decay {decay} ({path.name}); "
                                    f"train.ema_decays must match the run that wrote it")
        emas[decay] = load_file(path)
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    return load_file(directory / MODEL_FILE), emas, state
