"""Optimizers and LR schedules of the trainer: one optimizer and one schedule per ``Phase`` of a method."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..methods.base import Method, Phase


def build_optimizer(phase: Phase, params: list[Tensor]) -> torch.optim.Optimizer:
    """AdamW / Adam / Adafactor (transformers; fixed LR: no relative step, no parameter scaling) for one phase."""
    if phase.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=phase.lr, weight_decay=phase.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    cls = torch.optim.AdamW if phase.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=phase.lr, betas=phase.betas, eps=phase.eps, weight_decay=phase.weight_decay)


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the phase's LR over ``warmup_steps`` of that phase, then constant: update k (0-based) uses
    min(1, (k + 1) / warmup_steps) of the LR, so the first update already moves the weights."""
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps else 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                       num_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of one phase, over its own updates: 'linear_warmup' (``warmup_factor``) or a schedule of
    ``diffusers.optimization.get_scheduler`` (constant, constant_with_warmup, linear, cosine, ...), whose warm-up
    starts at LR 0 and whose decay reaches its end after ``num_updates`` updates of the phase."""
    if name == "linear_warmup":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps))
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_updates)


def phase_update_counts(method: Method, steps: int) -> dict[str, int]:
    """Updates of each phase in steps 0 .. steps - 1 (the length of its LR schedule)."""
    counts = {phase.name: 0 for phase in method.phases()}
    for step in range(steps):
        counts[method.phase_at(step)] += 1
    return counts


def with_configured_settings(optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
                             configured: list[dict[str, Any]], lr_factor: Callable[[int], float]) -> None:
    """Put this run's optimizer settings (LR, betas, weight decay, ...: ``configured``, one dict per param group)
    into a checkpoint's optimizer and LR-schedule states before they are loaded, the LR at the schedule's position.
    Equal settings leave the states as they are; ``train.resume=force`` with a new ``method.lr`` takes effect."""
    step = scheduler_state["last_epoch"]
    scheduler_state["base_lrs"] = [group["initial_lr"] for group in configured]
    scheduler_state["_last_lr"] = [group["initial_lr"] * lr_factor(step) for group in configured]
    for group, settings, lr in zip(optimizer_state["param_groups"], configured, scheduler_state["_last_lr"]):
        group.update({key: value for key, value in settings.items() if key != "params"}, lr=lr)


def phase_parameters(method: Method, phase: Phase) -> list[Tensor]:
    params = [p for name in phase.networks for p in method.networks[name].parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"phase {phase.name!r} has no trainable parameters in networks {phase.networks}")
    return params


def compile_trained_networks(method: Method, phases) -> None:
    """``torch.compile`` every network a phase trains, in place (``nn.Module.compile``: the module keeps its
    parameters and state-dict names, so checkpoints, EMA and exports are unchanged)."""
    for name in dict.fromkeys(n for phase in phases for n in phase.networks):
        method.networks[name].compile()
