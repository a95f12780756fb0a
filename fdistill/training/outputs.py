"""What a run writes besides checkpoints (``RunOutputs``, mixed into ``Trainer``): the inference view of the method
(EMA weights, FSDP gathered), sample grids, evaluations, logged scalars, the export and hub push, the start banner
and end summary."""
from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch import Tensor

from ..images import labelled_grid
from ..methods.base import Method
from .checkpoint import discard
from .hub import HubPushError, push_export, write_model_card
from .logging import (TENSORBOARD_DIR, flat_hparams, format_block, format_summary, log_image, notice,
                      parameter_counts, phase_scalars)
from .plots import CURVES_FILENAME, write_curves
from .sharding import full_tensors


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


class RunOutputs:
    """Samples, evaluations, logs, export and reports, for ``Trainer`` (which sets every attribute used here)."""

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
