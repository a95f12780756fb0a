"""``fdistill train <hydra overrides>``: compose ``conf/config.yaml``, build data / model / method, run the trainer.

Examples:
    fdistill train experiment=digits_teacher
    fdistill train experiment=digits_teacher train.steps=200 train.run_dir=runs/quick
    fdistill train --cfg job experiment=digits_teacher          # the composed config, no training
    fdistill train -m experiment=digits_teacher method.lr=1e-3,3e-4   # a sweep (fdistill.commands.hydra_habits)
    accelerate launch --num_processes 2 -m fdistill.cli train experiment=digits_teacher
On a machine without GPUs add --multi_gpu (it starts torchrun; train.device=cpu then joins a gloo group):
accelerate's --cpu flag alone starts ONE process whatever --num_processes says.
A bad key or value, a run_dir that another run holds, or resuming with changed run-defining settings (without
train.resume=force) stops before any work with a one-line message and exit code 2; a non-finite loss, a checkpoint
that cannot be written, or checkpoints of which none is intact stop with one line and exit code 1.
"""
from __future__ import annotations

import sys

from ..config import GROUPS, ConfigError, build_run, compose, config_dir, save_config

USAGE = """usage: fdistill train [KEY=VALUE ...]   (Hydra overrides)

Config groups (conf/<group>/<option>.yaml): {groups}
Keys: train.* (listed below with defaults), method.*, sampler.*, data.*, model.*, logger.* (log_with, project, mode)
Example: fdistill train experiment=digits_teacher train.steps=500 method.lr=1e-3"""


def available_options() -> str:
    root = config_dir()
    return "; ".join(f"{g}: {', '.join(sorted(p.stem for p in (root / g).glob('*.yaml')))}" for g in GROUPS)


def run_training(prog: str, overrides: list[str], method_name: str | None = None):
    """Compose, validate, build and fit one run; the shared body of ``fdistill train`` and ``fdistill distill``.

    Returns ``(exit_code, trainer, spec, run)``: exit code 2 (and ``trainer`` None) for a config error, a run_dir
    another run holds, or run-defining settings that differ from the checkpoint's; 1 for a non-finite loss, a
    checkpoint that cannot be written or none that can be resumed; 0 when training finished. config.yaml is written
    only once the run may proceed. ``method_name`` restricts the command to one method.
    """
    from omegaconf import OmegaConf

    from ..training import CheckpointError, NonFiniteLossError, ResumeConflict, RunDirLocked, Trainer

    try:
        spec = compose(overrides)
        if method_name is not None and spec.method_name != method_name:
            raise ConfigError(f"fdistill {prog} runs method={method_name}, got method.name={spec.method_name!r}")
        run = build_run(spec)
    except ConfigError as error:
        print(f"fdistill {prog}: config error: {error}", file=sys.stderr)
        return 2, None, None, None
    trainer = Trainer(run.method, run.data, spec.train, trackers=run.trackers, evaluator=run.evaluator,
                      run_config=OmegaConf.to_container(spec.cfg, resolve=True))
    try:
        trainer.open_run()
        if trainer.is_main:
            save_config(spec.cfg, trainer.run_dir / "config.yaml")
        trainer.fit()
    except (RunDirLocked, ResumeConflict) as error:
        print(f"fdistill {prog}: {error}", file=sys.stderr)
        return 2, trainer, spec, run
    except (NonFiniteLossError, CheckpointError) as error:
        print(f"fdistill {prog}: {error}", file=sys.stderr)
        return 1, trainer, spec, run
    return 0, trainer, spec, run


def main(argv: list[str]) -> int:
    from .hydra_habits import run_command

    return run_command("train", argv, USAGE.format(groups=available_options()),
                       lambda overrides: run_training("train", overrides)[0])
