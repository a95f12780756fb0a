"""The contract between a method (an objective) and the one trainer (``fdistill.training``).

A method owns its networks and says, per step, which phase runs, what that phase's loss is and which networks
it trains. It never calls ``backward`` or steps an optimizer: the trainer does the loop (micro-batches,
gradient accumulation, cross-process gradient averaging, mixed precision, clipping, EMA, checkpoints, logging).

Layout of a method (an ``nn.Module``):
- ``self.networks``: ``nn.ModuleDict`` of the networks some phase trains ('student', 'fake_score', ...).
  A network may hold frozen parameters too (LoRA base weights): what is trained is what has requires_grad.
- ``self.frozen``: ``nn.ModuleDict`` of frozen networks (teacher, reference, VAE, text encoders). All their parameters
  have ``requires_grad=False`` (the trainer asserts it) and they stay in eval mode whatever ``method.train(mode)``
  asks (a teacher with dropout gives deterministic targets). Checkpoints do not store them (they are rebuilt from
  the config), unless the method says otherwise in ``checkpoint_state_dict``.
- Persistent buffers anywhere outside ``frozen`` (e.g. f-distill's per-noise-level ratio statistics) are state:
  they are checkpointed and copied into EMA snapshots.

One optimisation step of the trainer:
    phase = method.phase_at(step)
    run_step_callbacks(method, phase, ctx)                       # the method's callbacks: ended phases, step start
    prepared = method.prepare_step(phase, micro_batches, ctx)   # optional no-grad pre-pass over the global step
    for item in prepared:                                        # one per micro-batch
        loss, logs = method.loss(phase, item, ctx)               # scalar, mean over the micro-batch
        (loss / len(prepared)).backward()
    average gradients over processes, clip, step the optimizer of ``phase``
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..validation import require

OPTIMIZERS = ("adamw", "adam", "adafactor")


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: the networks it trains and its optimizer settings.

    Attributes:
        name: phase name, unique within the method ('student', 'critic', 'model').
        networks: keys of ``method.networks`` trained in this phase (their parameters with requires_grad).
        lr: learning rate (> 0).
        weight_decay: decoupled weight decay (AdamW), >= 0.
        betas: Adam betas.
        eps: Adam epsilon.
        max_grad_norm: clip the global gradient norm of this phase's parameters; None = no clipping.
        optimizer: one of OPTIMIZERS.
        last_step: the last global step at which the phase runs (None = it may run until the end); once that step is
            done the trainer frees the phase's optimizer state (e.g. a finished DDO round's Adam moments), so neither
            device memory nor checkpoints grow with the number of finished phases.
    """

    name: str
    networks: tuple[str, ...]
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    optimizer: str = "adamw"
    last_step: int | None = None

    def __post_init__(self):
        # lr, weight_decay and optimizer come from the method's config, which validates them (check_optimizer_fields)
        require(bool(self.networks), f"phase {self.name!r}: trains no network")
        require(self.last_step is None or self.last_step >= 0,
                f"phase {self.name!r}: last_step must be >= 0 or None, got {self.last_step}")


def check_optimizer_fields(config) -> None:
    """Validate the optimizer fields method configs share: lr, weight_decay, betas, optimizer, max_grad_norm (the
    ValueError names ``method.<field>`` and the allowed values). The Phases a method builds take these values."""
    require(config.lr > 0, f"method.lr must be > 0, got {config.lr}")
    require(config.weight_decay >= 0, f"method.weight_decay must be >= 0, got {config.weight_decay}")
    require(len(config.betas) == 2 and all(0 <= b < 1 for b in config.betas),
            f"method.betas must be two values in [0, 1), got {list(config.betas)}")
    require(config.optimizer in OPTIMIZERS, f"method.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    require(config.max_grad_norm is None or config.max_grad_norm > 0,
            f"method.max_grad_norm must be > 0 or null, got {config.max_grad_norm}")


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class StepContext:
    """What a method may know about the step being run.

    Attributes:
        step: global optimisation step, 0-based (the step being computed).
        num_micro_batches: micro-batches in this step on this process (gradient accumulation).
        num_processes: data-parallel processes.
        all_reduce_mean: averages a tensor over processes (identity on one process); collective: every process
            must call it the same number of times in the same order.
        all_reduce_sum: sums a tensor over processes (identity on one process); collective, like all_reduce_mean.
            Global means of sparse statistics (per-bin sums and counts) reduce both by SUM and divide once.
        device: the device batches live on.
        training: False during evaluation passes (statistics such as ratio bins must then not be updated).
    """

    step: int
    num_micro_batches: int = 1
    num_processes: int = 1
    all_reduce_mean: Callable[[Tensor], Tensor] = _identity
    all_reduce_sum: Callable[[Tensor], Tensor] = _identity
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    training: bool = True


class StepCallback:
    """Work between optimisation steps that a method declares (``Method.callbacks``) and the trainer runs on every
    process before each training step (``run_step_callbacks``), e.g. DDO's self-play rounds. Both hooks run under
    no_grad, outside the step's random stream, and may use the collectives of ``ctx`` (every process calls them in
    the same order). Default: nothing."""

    def on_phase_end(self, phase: Phase, ctx: StepContext) -> None:
        """``phase``'s ``last_step`` is done and step ``ctx.step`` (= last_step + 1) is about to run. A phase that
        ends with the run ends in ``Method.export`` instead (no step follows it)."""

    def on_step_start(self, phase: str, ctx: StepContext) -> None:
        """Training step ``ctx.step`` of ``phase`` is about to run (after the ``on_phase_end`` calls due)."""


class Method(nn.Module):
    """Base class of the objectives (composition: a method holds networks, it does not inherit from another method)."""

    def __init__(self):
        super().__init__()
        self.networks = nn.ModuleDict()
        self.frozen = nn.ModuleDict()

    def phases(self) -> list[Phase]:
        """All phases of the method (the trainer builds one optimizer per phase)."""
        raise NotImplementedError

    def phase_at(self, step: int) -> str:
        """Name of the phase that runs at global step ``step``; default: the first (and only) phase."""
        return self.phases()[0].name

    def callbacks(self) -> list[StepCallback]:
        """The callbacks the trainer runs between steps (``run_step_callbacks``); default: none."""
        return []

    def prepare_step(self, phase: str, micro_batches: list[dict[str, Any]], ctx: StepContext) -> list[Any]:
        """Optional pre-pass over all micro-batches of a step (e.g. global normalisation statistics that need the
        whole global batch), run under no_grad; a method may enable grad inside to hand a graph on to ``loss`` (then
        that graph is backpropagated in the micro-batch's backward). Returns one item per micro-batch, passed to
        ``loss``. Default: unchanged."""
        return micro_batches

    def loss(self, phase: str, item: Any, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch (mean over its samples) and scalars to log."""
        raise NotImplementedError

    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` samples in data space (images in [-1, 1], [N, C, H, W]) for sample grids and evaluation."""
        raise NotImplementedError

    def export(self, directory: str | Path) -> None:
        """Write the trained model to ``directory`` as a model directory that ``fdistill sample`` and Diffusers load
        (``fdistill.denoisers.save_denoiser``). The trainer calls it at the end of a run with EMA weights swapped in;
        methods without an exportable model leave this unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} does not implement export()")

    def ema_networks(self) -> tuple[str, ...]:
        """Networks that get EMA copies (default: all trained networks)."""
        return tuple(self.networks.keys())

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint stores: everything except the frozen networks."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}

    def train(self, mode: bool = True) -> "Method":
        """Train (or eval) mode for everything but the frozen networks, which always stay in eval mode: the trainer's
        ``method.train()`` must not switch on dropout in a teacher or a reference (noisy targets, a DPO loss that
        no longer starts at log 2)."""
        super().train(mode)
        self.frozen.eval()
        return self

    def assert_frozen(self) -> None:
        """Fail loudly if a frozen network has a trainable parameter."""
        trainable = [n for n, p in self.frozen.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"frozen networks have trainable parameters: {trainable[:5]}")


def run_step_callbacks(method: Method, phase: str, ctx: StepContext) -> None:
    """Run ``method.callbacks()`` before training step ``ctx.step`` of ``phase``: ``on_phase_end`` of every phase
    whose ``last_step`` is ``ctx.step - 1``, then ``on_step_start``. The random state is forked (restored
    afterwards), so the callbacks' draws (lazily built evaluators, samplers) never shift the step's own: a run
    resumed at ``ctx.step`` draws what an uninterrupted one draws. A checkpoint written after step ``ctx.step - 1``
    precedes these calls, so a resumed run makes them again."""
    callbacks = method.callbacks()
    if not callbacks:
        return
    ended = [p for p in method.phases() if p.last_step is not None and p.last_step == ctx.step - 1]
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        for ended_phase in ended:
            for callback in callbacks:
                callback.on_phase_end(ended_phase, ctx)
        for callback in callbacks:
            callback.on_step_start(phase, ctx)
