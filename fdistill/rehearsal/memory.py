"""Memory of a rehearsal: the analytic minimum a training step holds (weights, gradients, optimizer states, EMA,
frozen networks) and the measured peak (resident set on CPU, CUDA allocator on GPU), in bytes or GiB."""
from __future__ import annotations

import ctypes
import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

GIB = 2 ** 30


def tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(param: Tensor, optimizer: str) -> int:
    """Bytes of one parameter's optimizer state: Adam(W) two moments; Adafactor without first moment (the
    trainer's setting) a row and a column factor of a matrix (leading dimensions folded into the rows), a full
    second moment of a vector."""
    if optimizer != "adafactor":
        return 2 * tensor_bytes(param)
    if param.ndim < 2:
        return tensor_bytes(param)
    rows, columns = math.prod(param.shape[:-1]), math.prod(param.shape[:-2]) * param.shape[-1]
    return (rows + columns) * param.element_size()


@dataclass
class AnalyticMemory:
    """The least memory a training step can hold, in bytes (activations not included)."""

    trained_weights: int
    gradients: int
    optimizer_states: int
    ema: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trained_weights + self.gradients + self.optimizer_states + self.ema + self.frozen


def trained_parameters(trainer) -> dict[int, tuple[Tensor, str]]:
    """Every parameter some phase trains (once, however many phases train it) with its phase's optimizer."""
    trained: dict[int, tuple[Tensor, str]] = {}
    for name, phase in trainer.phases.items():
        for param in trainer.params[name]:
            trained.setdefault(id(param), (param, phase.optimizer))
    return trained


def analytic_memory(trainer) -> AnalyticMemory:
    """Weights and optimizer states of the trained parameters, the gradients of the largest phase (the trainer
    frees a phase's gradients after its step: f-distill never holds the student's and the critic's at once), EMA
    snapshots, and every other parameter and buffer of the method (frozen networks, LoRA base weights, statistics)."""
    trained = trained_parameters(trainer)
    weights = sum(tensor_bytes(p) for p, _ in trained.values())
    others = [t for t in [*trainer.method.parameters(), *trainer.method.buffers()] if id(t) not in trained]
    largest_phase = max(sum(tensor_bytes(p) for p in params) for params in trainer.params.values())
    return AnalyticMemory(
        trained_weights=weights, gradients=largest_phase,
        optimizer_states=sum(optimizer_state_bytes(p, kind) for p, kind in trained.values()),
        ema=sum(tensor_bytes(t) for snapshot in trainer.ema.snapshots.values() for t in snapshot.values()),
        frozen=sum(tensor_bytes(t) for t in others))


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def resident_gib() -> float:
    """This process's resident set size now (GiB)."""
    return _status_kib("VmRSS") / 2 ** 20


class PeakMemory:
    """Peak memory of a stretch of code on ``device``: the resident set's high-water mark on CPU (Linux: reset by
    writing 5 to /proc/self/clear_refs), ``torch.cuda.max_memory_allocated`` on GPU. GiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed build-time heap (fp32 copies cast away) leaves the RSS
            Path("/proc/self/clear_refs").write_text("5")

    def current_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / GIB
        return resident_gib()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return _status_kib("VmHWM") / 2 ** 20
