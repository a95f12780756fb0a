"""Code that tests/test_trainer.py runs in other processes (not a test module).

- ``kill_at_step``: trackers for the ``logger`` config group whose ``KillAtStep`` SIGKILLs its own process when a step
  is logged, so a ``fdistill train`` subprocess dies hard at a known step (after its last checkpoint, before the
  next one).
- ``python tests/trainer_helpers.py OUT_DIR MICRO_BATCHES`` (plain or under ``accelerate launch``): trains the
  ``denoising`` method on a small Gaussian mixture for 3 steps and writes, per process, the averaged gradient of
  step 0 and the final weights to ``OUT_DIR/rank<k>.pt``.
- ``python tests/trainer_helpers.py fsdp OUT_DIR`` (under ``accelerate launch`` with an FSDP config): the FSDP runs of
  tests/test_fsdp.py (``fsdp_runs``); each process writes its gathered weights to ``OUT_DIR/<run>_rank<k>.pt``.
- ``python tests/trainer_helpers.py ratio_bins OUT_DIR`` (plain or under ``accelerate launch``): f-distill's
  globally normalised weights of one fixed global batch through the trainer's collectives (``ratio_bin_weights``).
- ``python tests/trainer_helpers.py lock RUN_DIR``: holds RUN_DIR's run lock, prints 'locked', and waits until its
  stdin closes (another run, for tests/test_faults.py).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker
from factories import probe_method, tiny_denoising_method

STEPS = 3
GLOBAL_BATCH = 8
# ``accelerate launch`` through this interpreter: the tests must not depend on the environment's bin/ being on PATH
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
FSDP_RUNS = ("denoising", "probe", "resumed")


class KillAtStep(GeneralTracker):
    """An accelerate tracker that kills the process when step ``step`` (or a later one) is logged."""

    name = "kill_at_step"
    requires_logging_directory = False

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    @property
    def tracker(self) -> None:
        return None

    def log(self, values: dict[str, float], step: int | None = None, **kwargs) -> None:
        if step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(config: dict, step: int):
    """``logger`` group target (``_partial_``, called with the run config): trackers holding ``KillAtStep(step)``."""
    from fdistill.training import Trackers

    return Trackers(log_with=[KillAtStep(step)], config=config)


def ring_data():
    from fdistill.data import gaussian_mixture

    return gaussian_mixture(preset="ring8", num_samples=64)


def fsdp_run_config(run_dir: Path, **overrides):
    """The FSDP test runs: 4 steps, 2 micro-batches per process (2 processes x 2 = the 4 micro-batches of a 1-process
    reference with micro_batches=4: the same random draws), EMA, checkpoints every 2 steps, FSDP units down to 250
    parameters. FSDP is switched on by the accelerate config the test launches with (one process: the plain path)."""
    from fdistill.training import TrainConfig

    return TrainConfig(**{"steps": 4, "batch_size": GLOBAL_BATCH, "micro_batches": 2, "device": "cpu",
                          "progress": False, "log_every": 1, "checkpoint_every": 2, "ema_decays": [0.9],
                          "fsdp_min_params": 250, "run_dir": str(run_dir), **overrides})


def fsdp_method(run: str):
    """The method of one FSDP test run; gradient clipping at 0.05 is active (gradient norms are larger)."""
    return probe_method() if run == "probe" else tiny_denoising_method(max_grad_norm=0.05)


def fsdp_runs(out_dir: Path) -> None:
    """Train each run of FSDP_RUNS in ``out_dir/<run>`` ('resumed' continues from the checkpoint that the test put
    there) and write ``out_dir/<run>_rank<k>.pt``: the gathered weights, whether FSDP was on, this process's
    share of the trained parameters and ``fsdp_samples`` (``Trainer.generate``, called by every process)."""
    from fdistill.training import Trainer
    from fdistill.training.sharding import full_tensors

    torch.set_num_threads(1)
    for run in FSDP_RUNS:
        method = fsdp_method(run)
        trainer = Trainer(method, ring_data(), fsdp_run_config(out_dir / run, export=run == "denoising"))
        trainer.fit()
        trained = [p for p in method.networks.parameters()]
        local = sum(p.to_local().numel() for p in trained) / sum(p.numel() for p in trained)
        torch.save({"weights": full_tensors(method.state_dict()), "fsdp": trainer.fsdp, "local_share": local,
                    "samples": fsdp_samples(trainer)}, out_dir / f"{run}_rank{trainer.accelerator.process_index}.pt")


def fsdp_samples(trainer) -> torch.Tensor:
    return trainer.generate(4, torch.Generator().manual_seed(0))


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


def ratio_bin_weights(out_dir: Path) -> None:
    """f-distill's weights h(r) of a fixed global batch of 16 (logits, quantiles) with 16 ratio bins, this process
    holding its contiguous share; writes this process's weights and the bin means to ``OUT_DIR/ratio_rank<k>.pt``."""
    import copy

    from fdistill.methods.fdistill import FDistill, FDistillConfig, PixelDomain
    from fdistill.networks import MLPDenoiser
    from fdistill.training import Trainer, TrainConfig

    torch.manual_seed(0)
    teacher = MLPDenoiser(dim=2, hidden=8, depth=1)
    method = FDistill(FDistillConfig(divergence="kl", num_ratio_bins=16), teacher, copy.deepcopy(teacher),
                      copy.deepcopy(teacher), PixelDomain((2,)))
    trainer = Trainer(method, ring_data(), TrainConfig(steps=1, batch_size=16, device="cpu", progress=False,
                                                       run_dir=str(out_dir / "run")))
    generator = torch.Generator().manual_seed(7)
    logits, quantiles = torch.randn(16, generator=generator) * 2, torch.rand(16, generator=generator)
    rank, world = trainer.accelerator.process_index, trainer.num_processes
    weights, _ = method.normalized_weights([logits.chunk(world)[rank]], [quantiles.chunk(world)[rank]],
                                           trainer.context(step=0, num_micro=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights[0], "bin_means": method.ratio.bin_means.clone(), "num_processes": world},
               out_dir / f"ratio_rank{rank}.pt")
def hold_lock_until_stdin_closes(run_dir: str) -> None:
    from fdistill.training.run_lock import RunLock

    lock = RunLock(run_dir)
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()


if __name__ == "__main__":
    if sys.argv[1] == "fsdp":
        fsdp_runs(Path(sys.argv[2]))
    elif sys.argv[1] == "ratio_bins":
        ratio_bin_weights(Path(sys.argv[2]))
    elif sys.argv[1] == "lock":
        hold_lock_until_stdin_closes(sys.argv[2])
    else:
        train_and_record(Path(sys.argv[1]), int(sys.argv[2]))
