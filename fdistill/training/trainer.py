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
(seed, step, global micro-batch index), which also makes a resumed run identical to an uninterrupted one.

With FSDP (``train.fsdp`` or an accelerate FSDP config; see ``sharding.py``) the trained networks are sharded
instead: FSDP reduce-scatters their gradients itself (once per step: micro-batches before the last one do not sync),
the same per-step arithmetic runs on shards, and checkpoints / samples / exports see full, gathered weights.

Before training (``open_run``) the main process locks ``run_dir`` (``run_lock.py``), removes what interrupted
checkpoint writes left, and picks the checkpoint to resume from: verified against its manifest, falling back past
damaged ones, refused when run-defining settings changed (``resume.py``); it says what it does on stderr.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..images import labelled_grid
from ..methods.base import Method, Phase, StepContext, run_step_callbacks
from .checkpoint import CheckpointError, discard, load_checkpoint, remove_leftovers, save_checkpoint
from .config import TrainConfig
from .ema import EMA
from .hub import HubPushError, push_export, write_model_card
from .logging import (TENSORBOARD_DIR, JsonlLogger, Trackers, finish_trackers, flat_hparams, format_block,
                      format_summary, log_image, parameter_counts, phase_scalars)
from .plots import CURVES_FILENAME, write_curves
from .resume import ResumeConflict, ResumePlan, plan_resume, run_defining_settings
from .run_lock import RunDirLocked, RunLock
from .sharding import (NetworkTemplates, check_fsdp_support, fsdp_requested, full_optimizer_state, full_tensors,
                       full_value, is_sharded, set_gradient_sync, shard_networks, shard_tensors_like,
                       sharded_optimizer_state)

Evaluator = Callable[[Callable[..., Tensor], int], dict[str, float]]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PREPARE_STREAM = 1 << 20  # RNG stream ids >= this are prepare passes (one per process), below: micro-batches


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step was not applied and no checkpoint was written after it."""


REFUSALS = (RunDirLocked, CheckpointError, ResumeConflict)  # why a run may refuse to start (one-line messages)


def notice(message: str) -> None:
    """A line for the person running the job (stderr: stdout may carry results)."""
    print(f"fdistill: {message}", file=sys.stderr, flush=True)


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, stream), well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and random: methods may draw from any of them."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def split_batch(batch: dict[str, Any], num: int) -> list[dict[str, Any]]:
    """Split every tensor / list of a batch dict into ``num`` equal consecutive micro-batches."""
    size = len(next(iter(batch.values())))
    if size % num:
        raise ValueError(f"batch of {size} does not split into {num} micro-batches")
    chunk = size // num
    return [{k: v[i * chunk:(i + 1) * chunk] for k, v in batch.items()} for i in range(num)]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


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


def default_run_config(config: TrainConfig, phases: list[Phase]) -> dict[str, Any]:
    """What a run built in Python (no resolved Hydra config) records as its settings: the train section and each
    phase's optimizer settings."""
    from dataclasses import asdict

    return {"train": asdict(config), "method": {"phases": {phase.name: asdict(phase) for phase in phases}}}


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


def save_sample_grid(samples: Tensor, path: Path, labels: list[str] | None = None):
    """Images in [-1, 1] ([N, C, H, W]) as one PNG grid (``fdistill.images.labelled_grid``: enlarged to >= 256 px,
    captioned with ``labels``), returned as a [H, W, 3] uint8 array; other samples (points) as a tensor file next
    to it (returns None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim != 4:
        torch.save(samples.float().cpu(), path.with_suffix(".pt"))
        return None
    grid = labelled_grid(samples, labels, nrow=max(1, int(math.sqrt(len(samples)))))
    Image.fromarray(grid).save(path)
    return grid


def grid_condition(method: Method, num: int, device: torch.device) -> tuple[Any, list[str] | None]:
    """The condition of a sample grid and its captions: classes 0 .. num_classes - 1 in turn for a class-conditional
    method (``method.num_classes``), its prompts in turn for a text-to-image one (``method.prompts``), else none."""
    if getattr(method, "num_classes", 0):
        classes = torch.arange(num, device=device) % method.num_classes
        return classes, [str(c) for c in classes.tolist()]
    prompts = getattr(method, "prompts", None)
    if prompts:
        chosen = [prompts[i % len(prompts)] for i in range(num)]
        return chosen, chosen
    return None, None


class Trainer:
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

    # ----------------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        """Full (unsharded) trainer state; collective under FSDP (gathers the optimizer states, kept by the main
        process only)."""
        return {
            "step": self.step,
            "optimizers": {k: full_optimizer_state(v.state_dict(), self.is_main) for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "scalers": {k: v.state_dict() for k, v in self.scalers.items()},
            "ema_updates": self.ema.num_updates,
            "torch_rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        """Checkpoint the current step: full state dicts (under FSDP every process helps gather them), the main
        process writes; everyone waits for it."""
        model = full_tensors(self.method.checkpoint_state_dict(), self.is_main)
        emas = {d: full_tensors(self.ema.state_dict(d), self.is_main) for d in self.ema.decays}
        state = self.trainer_state()
        if self.is_main:  # never rotate away the last checkpoint known to lead to a finite step
            protect = (self.last_good_checkpoint,) if self.last_good_checkpoint is not None else ()
            self.last_checkpoint = save_checkpoint(self.checkpoint_root, self.step, model, emas, state,
                                                   self.config.keep_last, self.settings, protect)
        self.last_checkpoint_step = self.step
        self.accelerator.wait_for_everyone()

    def load(self, directory: Path) -> None:
        """Load a checkpoint (full tensors, from any process count, with or without FSDP; sharded here as needed).
        This run's optimizer settings replace the checkpoint's (``with_configured_settings``)."""
        try:
            model, emas, state = load_checkpoint(directory, self.ema.decays)
        except FileNotFoundError as error:
            raise CheckpointError(str(error)) from error
        model = shard_tensors_like(model, self.method.state_dict())
        missing, unexpected = self.method.load_state_dict(model, strict=False)
        missing = [k for k in missing if not k.startswith("frozen.")]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {directory} does not match the method: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for decay, tensors in emas.items():
            self.ema.load_state_dict(decay, shard_tensors_like(tensors, self.ema.state_dict(decay)))
        for name, optimizer in self.optimizers.items():
            configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            with_configured_settings(state["optimizers"][name], state["schedulers"][name], configured,
                                     self.schedulers[name].lr_lambdas[0])
            optimizer.load_state_dict(sharded_optimizer_state(state["optimizers"][name], optimizer))
        for table, key in ((self.schedulers, "schedulers"), (self.scalers, "scalers")):
            for name, obj in table.items():
                obj.load_state_dict(state[key][name])
        self.ema.num_updates = int(state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.last_checkpoint, self.last_checkpoint_step = directory, self.step

    # ----------------------------------------------------------------------------------------------- opening a run
    def open_run(self) -> None:
        """Lock ``run_dir``, clean up after interrupted writes, and load the checkpoint to resume from (verified,
        guarded: ``resume.plan_resume``), saying so. ``fit`` calls it; call it first to write into ``run_dir`` only
        once the run may proceed (``fdistill train`` writes config.yaml then). Raises one of REFUSALS."""
        if self.opened:
            return
        plan = self._decided_by_main(self._plan)
        try:
            if plan.checkpoint is not None:
                self.load(plan.checkpoint)
                if self.is_main:
                    notice(f"resuming from step {self.step} (checkpoint {plan.checkpoint})")
        except BaseException:
            self.release_lock()
            raise
        self.opened = True

    def _plan(self) -> ResumePlan:
        """Main process: lock, clean up, choose the checkpoint; the lock is released again when this raises."""
        stale = self.lock.acquire()
        try:
            if stale:
                notice(f"took over the stale lock of {stale} ({self.lock.path}): that process no longer runs")
            for path in remove_leftovers(self.checkpoint_root):
                notice(f"removed incomplete checkpoint {path} (neither manifest nor trainer state: cut short)")
            for path in [*self.run_dir.glob(".tmp-model-*"), *self.run_dir.glob(".trash-model-*")]:  # cut exports
                shutil.rmtree(path)
            plan = plan_resume(self.checkpoint_root, self.config.resume, self.settings)
        except BaseException:
            self.release_lock()
            raise
        for line in plan.notes:
            notice(line)
        return plan

    def _decided_by_main(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` on the main process, its result (or refusal) broadcast to every process."""
        outcome = None
        if self.is_main:
            try:
                outcome = (decide(), None)
            except REFUSALS as error:
                outcome = (None, error)
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            outcome = broadcast_object_list([outcome])[0]
        value, error = outcome
        if error is not None:
            raise error
        return value

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------------------------- outputs
    @contextmanager
    def inference_model(self, on_all_processes: bool = False) -> Iterator[None]:
        """The method as outputs see it: first EMA snapshot swapped in (raw weights without EMA), eval mode, no grad.
        Under FSDP every process must enter (the sharded networks are gathered); on the main process (on every process
        with ``on_all_processes``) they are then replaced by full plain copies, so code inside runs there as on one
        process. Other processes must not run the method inside."""
        was_training = self.method.training
        with self.ema.swapped_in(), self._gathered_networks(on_all_processes), torch.no_grad():
            self.method.eval()
            try:
                yield
            finally:
                self.method.train(was_training)

    @contextmanager
    def _gathered_networks(self, on_all_processes: bool) -> Iterator[None]:
        if not self.fsdp:
            yield
            return
        keep = self.is_main or on_all_processes
        states = {name: full_tensors(network.state_dict(), keep) for name, network in self.sharded.items()}
        if not keep:
            yield
            return
        for name, state in states.items():
            self.method.networks[name] = self.templates.materialize(name, state, self.accelerator.device)
        try:
            yield
        finally:
            for name, network in self.sharded.items():
                self.method.networks[name] = network

    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """Samples of the method under ``inference_model`` (collective under FSDP: every process calls it and gets
        the samples)."""
        with self.inference_model(on_all_processes=True):
            return self.method.generate(num, generator=generator, cond=cond)

    def _sample(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``method.generate`` as it is: for use inside ``inference_model`` (the evaluator's sampling function)."""
        return self.method.generate(num, generator=generator, cond=cond)

    def write_samples(self) -> None:
        """The sample grid of this step (call inside ``inference_model``, on the main process)."""
        cond, labels = grid_condition(self.method, self.config.num_samples, self.accelerator.device)
        samples = self._sample(self.config.num_samples, torch.Generator().manual_seed(self.config.seed), cond)
        grid = save_sample_grid(samples, self.sample_grid_path(self.step), labels)
        if grid is not None:
            log_image(self.accelerator.trackers, "samples", grid, self.step)

    def evaluate(self) -> None:
        """Log the evaluator's metrics of this step (call inside ``inference_model``, on the main process)."""
        metrics = self.evaluator(self._sample, self.step)
        self.accelerator.log({f"eval/{k}": float(v) for k, v in metrics.items()}, step=self.step)

    def export(self) -> Path | None:
        """``method.export(run_dir / 'model')`` with EMA weights, written by the main process; None when the method
        has no export (or on other processes). Collective under FSDP: every process calls it. Written into a
        temporary directory and renamed into place, so ``model/`` exists only complete."""
        target, temporary = self.run_dir / "model", self.run_dir / f".tmp-model-{os.getpid()}"
        with self.inference_model():
            if not self.is_main:
                return None
            shutil.rmtree(temporary, ignore_errors=True)
            try:
                self.method.export(temporary)
            except NotImplementedError:
                shutil.rmtree(temporary, ignore_errors=True)
                return None
            write_model_card(temporary, self.run_dir)
        if target.exists():
            discard(target)
        os.rename(temporary, target)
        return target

    def push(self, exported: Path) -> None:
        """Upload the export to ``train.hub_repo_id``. A failed upload does not fail the finished run: it is
        reported with the command that retries it."""
        try:
            notice(f"pushed {exported} to {push_export(exported, self.config.hub_repo_id)}")
        except HubPushError as error:
            notice(f"{error}; retry with: fdistill push {self.run_dir} --repo-id {self.config.hub_repo_id}")

    def sample_grid_path(self, step: int) -> Path:
        """Where the sample grid of ``step`` goes (``save_sample_grid`` writes ``.pt`` instead for non-images)."""
        return self.run_dir / "samples" / f"step_{step:06d}.png"

    def complete_finished_run(self) -> None:
        """A run resumed at or past ``train.steps``: say so and write the final outputs a kill may have cut off
        (the last sample grid, the export)."""
        if self.is_main:
            notice(f"the run in {self.run_dir} is finished (step {self.step}, train.steps={self.config.steps}); "
                   f"raise train.steps to train further")
        grid = self.sample_grid_path(self.step)
        if self.config.sample_every > 0 and not (grid.exists() or grid.with_suffix(".pt").exists()):
            with self.inference_model():
                if self.is_main:
                    self.write_samples()
                    notice(f"wrote the missing final sample grid {grid.parent / grid.stem}.*")
        if self.config.export and not (self.run_dir / "model").exists() and self.export() is not None:
            notice(f"wrote the missing export {self.run_dir / 'model'}")

    def _periodic(self, every: int, final: bool) -> bool:
        return every > 0 and (self.step % every == 0 or final)

    def _after_step(self, logs: dict[str, float], started: float, start_step: int) -> None:
        final = self.step == self.config.steps
        self.pending_logs.update(phase_scalars(logs, self.method.phase_at(self.step - 1), len(self.phases) > 1))
        if self.step % self.config.log_every == 0 or final:
            keys = sorted(self.pending_logs)
            values = self.all_reduce_mean(torch.tensor([self.pending_logs[k] for k in keys],
                                                       device=self.accelerator.device))
            rate = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
            scalars = {**dict(zip(keys, values.tolist())), "steps_per_sec": rate,
                       "samples_per_sec": rate * self.config.batch_size}
            self.accelerator.log(scalars, step=self.step)
            self.last_logged.update(scalars)
            self.pending_logs.clear()
        if self.step % self.config.checkpoint_every == 0 or final:
            self.save()
        sample = self._periodic(self.config.sample_every, final)
        evaluate = self.evaluator is not None and self._periodic(self.config.eval_every, final)
        if sample or evaluate:
            with self.inference_model():
                if self.is_main and sample:
                    self.write_samples()
                if self.is_main and evaluate:
                    self.evaluate()

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

    # ----------------------------------------------------------------------------------------------- reports
    def run_info(self) -> dict[str, Any]:
        """What runs where (the start banner; logged as ``system.*`` hyper-parameters)."""
        trained = [p for params in self.params.values() for p in params]
        return {"device": str(self.accelerator.device), "torch": torch.__version__, "processes": self.num_processes,
                "method": type(self.method).__name__, "phases": ", ".join(self.phases),
                **parameter_counts(trained, list(self.method.parameters())),
                "global_batch": self.config.batch_size, "micro_batches": self.config.micro_batches,
                "micro_batch_size": self.config.batch_size // (self.num_processes * self.config.micro_batches),
                "mixed_precision": self.config.mixed_precision,
                "lr_scheduler": self.config.lr_scheduler, "steps": self.config.steps, "run_dir": str(self.run_dir),
                "trackers": ", ".join(["jsonl", *self.trackers.names()])}

    def start_trackers(self) -> None:
        """Start accelerate's trackers (main process) with the run config and ``run_info`` (as ``system.*``) as
        hyper-parameters, and print the start banner."""
        if not self.is_main:
            return
        info = self.run_info()
        hparams = {**flat_hparams(self.trackers.config), **flat_hparams(info, "system.")}
        self.accelerator.init_trackers(self.trackers.project, config=hparams,
                                       init_kwargs=self.trackers.init_kwargs(self.run_dir))
        print(format_block("fdistill train", info))

    def finish_report(self, start_step: int, started: float, exported: Path | None) -> None:
        """Write the curves PNG and print the end summary (main process)."""
        curves = write_curves(self.run_dir / "metrics.jsonl", self.run_dir / CURVES_FILENAME)
        outputs = {"metrics": self.run_dir / "metrics.jsonl", "curves": curves, "checkpoint": self.last_checkpoint,
                   "samples": self.run_dir / "samples" if self.config.sample_every else None, "model": exported,
                   "tensorboard": self.run_dir / TENSORBOARD_DIR / self.trackers.project
                   if "tensorboard" in self.trackers.names() else None}
        print(format_summary(self.step, self.step - start_step, time.perf_counter() - started, self.last_logged,
                             outputs))
