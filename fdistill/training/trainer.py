"""The one training loop: any ``fdistill.methods.Method`` on one CPU, one GPU or many processes (``accelerate launch``).

Per step (see ``fdistill/methods/base.py`` for the contract):
    phase = method.phase_at(step)
    this process's slice of the global batch -> micro-batches -> method.prepare_step (no grad unless it enables it)
    per micro-batch: loss = method.loss(...);  backward(loss / num_micro)        (autocast when mixed precision)
    all-reduce (mean) the gradients of the phase's parameters across processes    (one flat collective)
    NaN guard, clip (Phase.max_grad_norm), optimizer + LR-schedule step of the phase, EMA update
Averaging gradients by hand (no DDP wrapper) lets any phase structure work, and makes 1 process x 4 micro-batches
equal 2 processes x 2 micro-batches: data order and every micro-batch's random draws are pure functions of
(seed, step, global micro-batch index), which also makes a resumed run identical to an uninterrupted one.

With FSDP (``train.fsdp`` or an accelerate FSDP config; see ``sharding.py``) the trained networks are sharded
instead: FSDP reduce-scatters their gradients itself (once per step: micro-batches before the last one do not sync),
the same per-step arithmetic runs on shards, and checkpoints / samples / exports see full, gathered weights.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..methods.base import Method, Phase, StepContext
from .checkpoint import latest_checkpoint, load_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import TrainConfig
from .ema import EMA
from .logging import JsonlLogger, Logger, LoggerGroup
from .sharding import (NetworkTemplates, check_fsdp_support, fsdp_requested, full_optimizer_state, full_tensors,
                       full_value, is_sharded, set_gradient_sync, shard_networks, shard_tensors_like,
                       sharded_optimizer_state)

Evaluator = Callable[[Callable[..., Tensor], int], dict[str, float]]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PREPARE_STREAM = 1 << 20  # RNG stream ids >= this are prepare passes (one per process), below: micro-batches


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step was not applied and no checkpoint was written after it."""


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
    """Linear warm-up to the phase's LR over ``warmup_steps`` of that phase, then constant."""
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps else 1.0


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


def save_sample_grid(samples: Tensor, path: Path) -> None:
    """Images in [-1, 1] ([N, C, H, W]) as one PNG grid; other samples (points) as a tensor file next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        from torchvision.utils import save_image

        save_image((samples.float().cpu() + 1) / 2, path, nrow=max(1, int(math.sqrt(len(samples)))), padding=1)
    else:
        torch.save(samples.float().cpu(), path.with_suffix(".pt"))


class Trainer:
    """Runs ``method`` on ``data`` (a DataSource) for ``config.steps`` steps.

    Args:
        method: the objective (its networks are moved to the accelerator's device).
        data: DataSource with ``loader(batch_size, seed, start_step, rank, world_size, num_workers)``.
        config: TrainConfig.
        loggers: extra loggers (wandb); ``run_dir/metrics.jsonl`` is always written.
        evaluator: optional ``evaluate(generate_fn, step) -> dict`` run every ``eval_every`` steps (main process).
        accelerator: an ``accelerate.Accelerator``; default one built from ``config.device``.
    """

    def __init__(self, method: Method, data, config: TrainConfig, loggers: list[Logger] | None = None,
                 evaluator: Evaluator | None = None, accelerator=None):
        from accelerate import Accelerator

        self.accelerator = accelerator or Accelerator(cpu=config.device == "cpu")
        self.method, self.data, self.config, self.evaluator = method, data, config, evaluator
        self.run_dir = Path(config.run_dir)
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
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(config.lr_warmup_steps))
                           for name, opt in self.optimizers.items()}
        device_type = self.accelerator.device.type
        self.scalers = {name: torch.amp.GradScaler(device_type, enabled=config.mixed_precision == "fp16")
                        for name in self.phases}
        self.ema = EMA(method, config.ema_decays, config.ema_warmup_steps)
        ema_nets = set(method.ema_networks())
        self.phase_updates_ema = {name: bool(ema_nets & set(p.networks)) for name, p in self.phases.items()}
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.metrics_log = JsonlLogger(self.run_dir / "metrics.jsonl") if self.is_main else None
        self.logger = LoggerGroup(([self.metrics_log] if self.is_main else []) + list(loggers or []))

    # ----------------------------------------------------------------------------------------------- collectives
    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over processes (identity on one process); every process must call it in the same order."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

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
                           all_reduce_mean=self.all_reduce_mean, device=self.accelerator.device, training=training)

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
                f"applied; last good checkpoint: {self.last_checkpoint or 'none'}")
        lr = self.schedulers[phase_name].get_last_lr()[0]  # the LR of this update (the scheduler steps after it)
        grad_norm = self._apply_update(phase, params, scaler)
        return {**totals, "loss": mean_loss.item(), "grad_norm": grad_norm, "lr": lr}

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
        if self.is_main:
            self.last_checkpoint = save_checkpoint(self.checkpoint_root, self.step, model, emas, state,
                                                   self.config.keep_last)
        self.accelerator.wait_for_everyone()

    def resume_from(self) -> Path | None:
        """The checkpoint to resume from according to ``train.resume``."""
        resume = self.config.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.checkpoint_root)
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint directory")
        return Path(resume)

    def load(self, directory: Path) -> None:
        """Load a checkpoint (full tensors, from any process count, with or without FSDP; sharded here as needed)."""
        model, emas, state = load_checkpoint(directory, self.ema.decays)
        model = shard_tensors_like(model, self.method.state_dict())
        missing, unexpected = self.method.load_state_dict(model, strict=False)
        missing = [k for k in missing if not k.startswith("frozen.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {directory} does not match the method: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        for decay, tensors in emas.items():
            self.ema.load_state_dict(decay, shard_tensors_like(tensors, self.ema.state_dict(decay)))
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(sharded_optimizer_state(state["optimizers"][name], optimizer))
        for table, key in ((self.schedulers, "schedulers"), (self.scalers, "scalers")):
            for name, obj in table.items():
                obj.load_state_dict(state[key][name])
        self.ema.num_updates = int(state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.last_checkpoint = directory

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
        samples = self._sample(self.config.num_samples, torch.Generator().manual_seed(self.config.seed))
        save_sample_grid(samples, self.run_dir / "samples" / f"step_{self.step:06d}.png")

    def evaluate(self) -> None:
        """Log the evaluator's metrics of this step (call inside ``inference_model``, on the main process)."""
        metrics = self.evaluator(self._sample, self.step)
        self.logger.log({f"eval/{k}": float(v) for k, v in metrics.items()}, self.step)

    def export(self) -> Path | None:
        """``method.export(run_dir / 'model')`` with EMA weights, written by the main process; None when the method
        has no export (or on other processes). Collective under FSDP: every process calls it."""
        with self.inference_model():
            if not self.is_main:
                return None
            try:
                self.method.export(self.run_dir / "model")
            except NotImplementedError:
                return None
        return self.run_dir / "model"

    def _periodic(self, every: int, final: bool) -> bool:
        return every > 0 and (self.step % every == 0 or final)

    def _after_step(self, logs: dict[str, float], started: float, start_step: int) -> None:
        final = self.step == self.config.steps
        if self.step % self.config.log_every == 0 or final:
            keys = sorted(logs)
            values = self.all_reduce_mean(torch.tensor([logs[k] for k in keys], device=self.accelerator.device))
            rate = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
            self.logger.log({**dict(zip(keys, values.tolist())), "steps_per_sec": rate,
                             "samples_per_sec": rate * self.config.batch_size}, self.step)
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
        """Train to ``config.steps`` (resuming per ``config.resume``), export at the end; returns the method."""
        from tqdm.auto import tqdm

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_root)
        self.accelerator.wait_for_everyone()
        checkpoint = self.resume_from()
        if checkpoint is not None:
            self.load(checkpoint)
        if self.metrics_log is not None:  # one row per step: drop what a killed run logged after its checkpoint
            self.metrics_log.drop_after(self.step)
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
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4g}")
                self._after_step(logs, started, start_step)
            if self.config.export:
                self.export()
        finally:
            progress.close()
            self.logger.finish()
        self.accelerator.wait_for_everyone()
        return self.method
