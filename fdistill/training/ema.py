"""Exponential moving averages of a method's EMA networks, several decays at once.

Each snapshot holds, under the method's own state-dict keys, the float32 average of every parameter of
``method.ema_networks()`` and a copy of the method's persistent buffers outside ``frozen`` (e.g. f-distill's ratio
statistics), so a snapshot loaded into the method (``swapped_in``) is a complete, consistent model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from ..methods.base import Method


def ema_parameter_names(method: Method) -> list[str]:
    """State-dict keys of the parameters of the method's EMA networks."""
    return [f"networks.{net}.{name}" for net in method.ema_networks()
            for name, _ in method.networks[net].named_parameters()]


def persistent_buffer_names(method: Method) -> list[str]:
    """State-dict keys of persistent buffers outside ``frozen``."""
    parameters = set(dict(method.named_parameters()))
    return [k for k in method.state_dict() if k not in parameters and not k.startswith("frozen.")]


def ema_decay_at(decay: float, num_updates: int, warmup_steps: int) -> float:
    """Decay of update number ``num_updates`` (0-based): min(decay, (1 + k) / (10 + k)) during warm-up."""
    if num_updates < warmup_steps:
        return min(decay, (1 + num_updates) / (10 + num_updates))
    return decay


class EMA:
    """EMA snapshots of ``method`` for each decay in ``decays``; ``update()`` after each optimizer step of a phase that
    trains an EMA network."""

    def __init__(self, method: Method, decays: list[float], warmup_steps: int = 0):
        self.method = method
        self.decays = [float(d) for d in decays]
        self.warmup_steps = warmup_steps
        self.num_updates = 0
        self.parameter_names = ema_parameter_names(method)
        self.buffer_names = persistent_buffer_names(method)
        live = method.state_dict()
        self.snapshots = {d: {k: live[k].detach().float().clone() if live[k].is_floating_point() else live[k].clone()
                              for k in self.parameter_names + self.buffer_names} for d in self.decays}

    @torch.no_grad()
    def update(self) -> None:
        live = self.method.state_dict()
        for decay, snapshot in self.snapshots.items():
            weight = 1.0 - ema_decay_at(decay, self.num_updates, self.warmup_steps)
            for key in self.parameter_names:
                snapshot[key].lerp_(live[key].float(), weight)
            for key in self.buffer_names:
                snapshot[key].copy_(live[key])
        self.num_updates += 1

    def state_dict(self, decay: float) -> dict[str, Tensor]:
        return self.snapshots[decay]

    def load_state_dict(self, decay: float, tensors: dict[str, Tensor]) -> None:
        missing = set(self.snapshots[decay]) - set(tensors)
        if missing:
            raise KeyError(f"EMA {decay} checkpoint lacks {sorted(missing)[:5]}")
        for key, value in self.snapshots[decay].items():
            value.copy_(tensors[key])

    @contextmanager
    def swapped_in(self, decay: float | None = None) -> Iterator[None]:
        """Temporarily load the snapshot of ``decay`` (default: the first decay) into the method; no-op without EMA."""
        if not self.decays:
            yield
            return
        snapshot = self.snapshots[self.decays[0] if decay is None else decay]
        live = self.method.state_dict()
        backup = {k: live[k].detach().clone() for k in snapshot}
        self.method.load_state_dict(snapshot, strict=False)
        try:
            yield
        finally:
            self.method.load_state_dict(backup, strict=False)
