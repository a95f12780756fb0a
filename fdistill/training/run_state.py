"""Checkpoint and resume glue of the trainer (``RunState``, mixed into ``Trainer``): open a run (lock ``run_dir``,
clean up interrupted writes, pick and load the checkpoint to resume from), save and load the full trainer state.

Before training (``open_run``) the main process locks ``run_dir`` (``run_lock.py``), removes what interrupted
checkpoint writes left, and picks the checkpoint to resume from: verified against its manifest, falling back past
damaged ones, refused when run-defining settings changed (``resume.py``); it says what it does on stderr.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..methods.base import Phase
from .checkpoint import CheckpointError, load_checkpoint, remove_leftovers, save_checkpoint
from .config import TrainConfig
from .logging import notice
from .optimization import with_configured_settings
from .resume import ResumeConflict, ResumePlan, plan_resume
from .run_lock import RunDirLocked
from .sharding import full_optimizer_state, full_tensors, shard_tensors_like, sharded_optimizer_state

REFUSALS = (RunDirLocked, CheckpointError, ResumeConflict)  # why a run may refuse to start (one-line messages)


def default_run_config(config: TrainConfig, phases: list[Phase]) -> dict[str, Any]:
    """What a run built in Python (no resolved Hydra config) records as its settings: the train section and each
    phase's optimizer settings."""
    from dataclasses import asdict

    return {"train": asdict(config), "method": {"phases": {phase.name: asdict(phase) for phase in phases}}}


class RunState:
    """Checkpoints and resuming, for ``Trainer`` (which sets every attribute used here: method, config, ema,
    optimizers, schedulers, scalers, step, settings, lock, ...)."""

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
