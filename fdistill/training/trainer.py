"""The one training loop: any ``fdistill.methods.Method`` on one CPU, one GPU or many processes (``accelerate launch``).

Per step (see ``fdistill/methods/base.py`` for the contract):
    phase = method.phase_at(step)
    method.callbacks(): on_phase_end of phases whose last_step was the previous step, on_step_start (run_step_callbacks)
    this process's slice of the global batch -> micro-batches -> method.prepare_step (no grad unless it enables it)
    per micro-batch: loss = method.loss(...);  backward(loss / num_micro)        (autocast when mixed precision)
    all-reduce (mean) the gradients of the phase's parameters across processes    (one flat collective)
    NaN guard, clip (Phase.max_grad_norm), optimizer + LR-schedule step of the phase, EMA update
    free the optimizer state of phases past their ``Phase.last_step``
Averaging gradients by hand (no DDP wrapper) lets any phase structure work, and makes 1 process x 4 micro-batches
equal 2 processes x 2 micro-batches: data order and every micro-batch's random draws are pure functions of
(seed, step, global micro-batch index) (``batches.py``), which also makes a resumed run identical to an uninterrupted
one. Checkpoints and resuming: ``run_state.py``; samples, evaluation, logs, export, reports: ``outputs.py``;
optimizers and LR schedules: ``optimization.py``.

With FSDP (``train.fsdp`` or an accelerate FSDP config; see ``sharding.py``) the trained networks are sharded
instead: FSDP reduce-scatters their gradients itself (once per step: micro-batches before the last one do not sync),
the same per-step arithmetic runs on shards, and checkpoints / samples / exports see full, gathered weights.

Before training (``open_run``, ``run_state.py``) the main process locks ``run_dir``, cleans up after interrupted
checkpoint writes and picks the checkpoint to resume from.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..methods.base import Method, Phase, StepContext, run_step_callbacks
from .batches import PREPARE_STREAM, seed_all, split_batch, stream_seed, to_device
from .config import TrainConfig
from .ema import EMA
from .logging import TENSORBOARD_DIR, JsonlLogger, Trackers, finish_trackers
from .optimization import (build_lr_scheduler, build_optimizer, compile_trained_networks, phase_parameters,
                           phase_update_counts)
from .outputs import RunOutputs, save_sample_grid
from .resume import run_defining_settings
from .run_lock import RunLock
from .run_state import REFUSALS, RunState, default_run_config
from .sharding import (NetworkTemplates, check_fsdp_support, fsdp_requested, full_value, is_sharded,
                       set_gradient_sync, shard_networks)

__all__ = ["REFUSALS", "NonFiniteLossError", "Trainer", "save_sample_grid", "seed_all", "split_batch", "stream_seed"]

Evaluator = Callable[[Callable[..., Tensor], int], dict[str, float]]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step was not applied and no checkpoint was written after it."""


class Trainer(RunState, RunOutputs):
    """Runs ``method`` on ``data`` (a DataSource) for ``config.steps`` steps.

    Args:
        method: the objective (its networks are moved to the accelerator's device).
        data: DataSource with ``loader(batch_size, seed, start_step, rank, world_size, num_workers)``.
        config: TrainConfig.
        trackers: accelerate trackers (wandb, tensorboard: ``fdistill.training.logging.Trackers``) beside
            ``run_dir/metrics.jsonl``, which is always written.
        evaluator: optional ``evaluate(generate_fn, step) -> dict`` run every ``eval_every`` steps (main process).
        run_config: the resolved run config (nested dicts); its run-defining entries (``resume.py``) are recorded in
            every checkpoint and guard resumes. Default: ``default_run_config``.
    """

    def __init__(self, method: Method, data, config: TrainConfig, trackers: Trackers | None = None,
                 evaluator: Evaluator | None = None, run_config: dict[str, Any] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.method, self.data, self.config, self.evaluator = method, data, config, evaluator
        self.run_dir = Path(config.run_dir)
        self.trackers = trackers or Trackers()
        jsonl = JsonlLogger(self.run_dir / "metrics.jsonl")
        self.accelerator = Accelerator(
            cpu=config.device == "cpu", log_with=[jsonl, *self.trackers.log_with],
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / TENSORBOARD_DIR)))
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.is_main = self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes
        per_process, rest = divmod(config.batch_size, self.num_processes * config.micro_batches)
        if rest or not per_process:
            raise ValueError(f"train.batch_size={config.batch_size} must be a positive multiple of "
                             f"num_processes ({self.num_processes}) x train.micro_batches ({config.micro_batches})")
        method.assert_frozen()
        self.phases = {phase.name: phase for phase in method.phases()}
        self.fsdp = self.num_processes > 1 and fsdp_requested(config.fsdp, self.accelerator.distributed_type)
        self.sharded = {name: method.networks[name] for name in dict.fromkeys(
            n for phase in self.phases.values() for n in phase.networks)} if self.fsdp else {}
        if self.fsdp:
            check_fsdp_support(self.phases.values(), config.mixed_precision)
        self.templates = NetworkTemplates(self.sharded) if self.fsdp else None
        method.to(self.accelerator.device)
        self._broadcast_state()
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.accelerator.device.type, (self.num_processes,))
            shard_networks(self.sharded, mesh, config.fsdp_min_params)
        if config.compile:
            compile_trained_networks(method, self.phases.values())
        self.params = {name: phase_parameters(method, phase) for name, phase in self.phases.items()}
        self.optimizers = {name: build_optimizer(phase, self.params[name]) for name, phase in self.phases.items()}
        updates = phase_update_counts(method, config.steps)
        self.schedulers = {name: build_lr_scheduler(opt, config.lr_scheduler, config.lr_warmup_steps, updates[name])
                           for name, opt in self.optimizers.items()}
        device_type = self.accelerator.device.type
        self.scalers = {name: torch.amp.GradScaler(device_type, enabled=config.mixed_precision == "fp16")
                        for name in self.phases}
        self.ema = EMA(method, config.ema_decays, config.ema_warmup_steps)
        ema_nets = set(method.ema_networks())
        self.phase_updates_ema = {name: bool(ema_nets & set(p.networks)) for name, p in self.phases.items()}
        self.settings = run_defining_settings(run_config if run_config is not None
                                              else default_run_config(config, list(self.phases.values())))
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.metrics_log = jsonl if self.is_main else None
        self.pending_logs: dict[str, float] = {}   # latest scalars of each phase since the last log step
        self.last_logged: dict[str, float] = {}
        self.last_checkpoint_step: int | None = None
        self.last_good_checkpoint: Path | None = None   # the newest checkpoint whose next step was finite
        self.lock = RunLock(self.run_dir) if self.is_main else None
        self.opened = False

    # ----------------------------------------------------------------------------------------------- collectives
    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over processes (identity on one process); every process must call it in the same order."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (identity on one process); every process must call it in the same order."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def _broadcast_state(self) -> None:
        """Start every process from process 0's weights and buffers."""
        if self.num_processes == 1:
            return
        import torch.distributed as dist

        for tensor in self.method.state_dict().values():
            dist.broadcast(tensor.data, src=0)

    def _average_gradients(self, params: list[Tensor]) -> None:
        """One flat all-reduce (mean) of the phase's gradients; missing gradients count as zeros. Sharded (FSDP)
        parameters are skipped: FSDP has already reduce-scattered their gradients (a mean as well)."""
        params = [p for p in params if not is_sharded(p)]
        if self.num_processes == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    # ----------------------------------------------------------------------------------------------- one step
    def context(self, step: int, num_micro: int, training: bool = True) -> StepContext:
        return StepContext(step=step, num_micro_batches=num_micro, num_processes=self.num_processes,
                           all_reduce_mean=self.all_reduce_mean, all_reduce_sum=self.all_reduce_sum,
                           device=self.accelerator.device, training=training)

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.config.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype) if dtype else nullcontext()

    def train_step(self, step: int, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step on this process's share of the global batch; returns local scalars."""
        phase_name = self.method.phase_at(step)
        phase, params, scaler = self.phases[phase_name], self.params[phase_name], self.scalers[phase_name]
        micro = split_batch(to_device(batch, self.accelerator.device), self.config.micro_batches)
        ctx = self.context(step, len(micro))
        seed_all(stream_seed(self.config.seed, step, PREPARE_STREAM + self.accelerator.process_index))
        with torch.no_grad(), self.autocast():
            run_step_callbacks(self.method, phase_name, ctx)
            items = self.method.prepare_step(phase_name, micro, ctx)
        totals: dict[str, float] = {}
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for index, item in enumerate(items):
            set_gradient_sync(self.sharded.values(), index == len(items) - 1)
            seed_all(stream_seed(self.config.seed, step, self.accelerator.process_index * len(items) + index))
            with self.autocast():
                loss, logs = self.method.loss(phase_name, item, ctx)
            scaler.scale(loss.float() / len(items)).backward()
            loss_sum += loss.detach().float()
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + float(value) / len(items)
        mean_loss = self.all_reduce_mean(loss_sum / len(items))
        if not torch.isfinite(mean_loss):
            self.optimizers[phase_name].zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({mean_loss.item()}) at step {step} in phase {phase_name!r}: the update was not "
                f"applied; last checkpoint whose next step was finite: {self.last_good_checkpoint or 'none'}")
        lr = self.schedulers[phase_name].get_last_lr()[0]  # the LR of this update (the scheduler steps after it)
        grad_norm = self._apply_update(phase, params, scaler)
        self._free_finished_optimizers(step)
        return {**totals, "loss": mean_loss.item(), "grad_norm": grad_norm, "lr": lr}

    def _free_finished_optimizers(self, step: int) -> None:
        """Drop the optimizer state of every phase whose ``last_step`` is done (it never steps again)."""
        for name, phase in self.phases.items():
            if phase.last_step is not None and phase.last_step <= step:
                self.optimizers[name].state.clear()

    def _apply_update(self, phase: Phase, params: list[Tensor], scaler) -> float:
        """Average gradients across processes, unscale (fp16), clip, step; returns the pre-clip gradient norm.
        An fp16 step the loss scaler skips (inf/NaN gradients: its scale drops) leaves the LR schedule and EMA alone."""
        optimizer = self.optimizers[phase.name]
        self._average_gradients(params)
        scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if phase.max_grad_norm is not None:  # on shards: the norm of the full gradient (DTensor reductions)
            norm = torch.nn.utils.clip_grad_norm_(params, phase.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = full_value(norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.get_scale() < scale:
            return float(norm)
        self.schedulers[phase.name].step()
        if self.phase_updates_ema[phase.name]:
            self.ema.update()
        return float(norm)

    # ----------------------------------------------------------------------------------------------- the loop
    def fit(self) -> Method:
        """Train to ``config.steps`` (resuming per ``config.resume``), export at the end; returns the method.
        A run already at ``config.steps`` only completes missing final outputs (``complete_finished_run``)."""
        self.open_run()
        try:
            if self.metrics_log is not None:  # one row per step: drop what a killed run logged after its checkpoint
                self.metrics_log.drop_after(self.step)
            self.start_trackers()
            if self.step >= self.config.steps:
                self.complete_finished_run()
            else:
                self._train()
        finally:
            finish_trackers(self.accelerator.trackers)
            self.release_lock()
        self.accelerator.wait_for_everyone()
        return self.method

    def _train(self) -> None:
        from tqdm.auto import tqdm

        start_step, started = self.step, time.perf_counter()
        batches = self.data.loader(self.config.batch_size, seed=self.config.seed, start_step=self.step,
                                   rank=self.accelerator.process_index, world_size=self.num_processes,
                                   num_workers=self.config.num_workers)
        progress = tqdm(total=self.config.steps, initial=self.step, disable=not (self.is_main and self.config.progress),
                        desc="train", dynamic_ncols=True)
        self.method.train()
        try:
            while self.step < self.config.steps:
                logs = self.train_step(self.step, next(batches))
                if self.last_checkpoint_step == self.step:
                    self.last_good_checkpoint = self.last_checkpoint
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4g}")
                self._after_step(logs, started, start_step)
            exported = self.export() if self.config.export else None
            if self.is_main and exported is not None and self.config.push_to_hub:
                self.push(exported)
        finally:
            progress.close()
        if self.is_main:
            self.finish_report(start_step, started, exported)
