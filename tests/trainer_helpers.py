"""Code that tests/test_trainer.py runs in other processes (not a test module).

- ``KillAtStep``: a logger for the ``logger`` config group that SIGKILLs its own process when a step is logged, so a
  ``fdistill train`` subprocess dies hard at a known step (after its last checkpoint, before the next one).
- ``python tests/trainer_helpers.py OUT_DIR MICRO_BATCHES`` (plain or under ``accelerate launch``): trains the
  ``denoising`` method on a small Gaussian mixture for 3 steps and writes, per process, the averaged gradient of
  step 0 and the final weights to ``OUT_DIR/rank<k>.pt``.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

STEPS = 3
GLOBAL_BATCH = 8


class KillAtStep:
    """Logger (``_partial_`` factory target, called with run_dir and config) that kills the process at ``step``."""

    def __init__(self, run_dir: str, config: dict, step: int):
        self.step = step

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> None:
        pass


def tiny_denoising_method():
    """A denoising method with a small EDM-preconditioned MLP (same weights in every process: seeded)."""
    from fdistill.methods.denoising import Denoising, DenoisingConfig
    from fdistill.networks import MLPDenoiser

    torch.manual_seed(0)
    network = MLPDenoiser(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(network.net.output[-1].weight, std=0.1)  # non-zero output layer: every weight gets a gradient
    return Denoising(DenoisingConfig(lr=1e-2, max_grad_norm=None), network, (2,))


def train_and_record(out_dir: Path, micro_batches: int) -> None:
    from fdistill.data import gaussian_mixture
    from fdistill.training import Trainer, TrainConfig

    torch.set_num_threads(1)
    method = tiny_denoising_method()
    config = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, micro_batches=micro_batches, device="cpu",
                         progress=False, export=False, log_every=1, checkpoint_every=STEPS, run_dir=str(out_dir / "run"))
    trainer = Trainer(method, gaussian_mixture(preset="ring8", num_samples=64), config)
    average = trainer._average_gradients
    first_gradients: list[torch.Tensor] = []

    def record(params):
        average(params)
        if not first_gradients:
            first_gradients.extend(p.grad.detach().clone() for p in params)

    trainer._average_gradients = record
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in method.state_dict().items()}
    rank = trainer.accelerator.process_index
    torch.save({"gradients": first_gradients, "weights": weights, "num_processes": trainer.num_processes},
               out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    train_and_record(Path(sys.argv[1]), int(sys.argv[2]))
