"""Atomic, rotating checkpoints: ``run_dir/checkpoints/step_XXXXXX/``.

Layout of one checkpoint:
    model.safetensors          method.checkpoint_state_dict() (everything but the frozen networks)
    ema_<decay>.safetensors    one per EMA decay
    trainer_state.pt           step, optimizer / LR-scheduler / loss-scaler states, EMA update count, RNG state:
                               plain containers of tensors and numbers, loaded with ``weights_only=True``
A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed into place: a crash
at any point leaves either the complete new checkpoint or none, never a partial one. Weights never go through
pickle; nothing is unpickled beyond tensors and plain containers.
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

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"


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
    """Complete checkpoints under ``root`` (``run_dir/checkpoints``), sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return sorted((step, p) for step, p in found if (p / TRAINER_STATE).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, model: dict[str, Tensor], emas: dict[float, dict[str, Tensor]],
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically under ``root``, then delete all but the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    temporary = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(_plain_tensors(model), temporary / MODEL_FILE)
    for decay, tensors in emas.items():
        save_file(_plain_tensors(tensors), temporary / ema_file(decay))
    torch.save(trainer_state, temporary / TRAINER_STATE)
    for path in temporary.iterdir():
        _fsync(path)
    _fsync(temporary)
    if final.exists():  # the same step written again (a run restarted with resume=never)
        shutil.rmtree(final)
    os.rename(temporary, final)
    _fsync(root)
    rotate_checkpoints(root, keep_last)
    return final


def rotate_checkpoints(root: str | Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete leftovers of checkpoint writes that died before their rename."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)


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
