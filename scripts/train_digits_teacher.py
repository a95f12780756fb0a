"""Train the digits teacher that ships with the package and write it to ``fdistill/assets/digits_teacher/``.

    python scripts/train_digits_teacher.py                 # 2,500 steps of batch 128, 1 thread
    python scripts/train_digits_teacher.py --steps 300 --out /tmp/teacher    # a quick try, elsewhere

The teacher is the ``digits_teacher`` recipe with the ~178k-parameter ``digits_small_unet`` (class-conditional;
16 / 32 channels, attention at 4x4). Its digits FD falls with training: 11.1 at 500 steps, 3.46 at 1,000, 2.51 at
1,500, 1.72 at 2,000, 1.49 at 2,500 (``benchmarks/README.md``, "Main job"):

    fdistill train experiment=digits_teacher model=digits_small_unet train.steps=2500

Its exported EMA weights (``run_dir/model``, an fdistill model directory: fdistill.json + unet/ safetensors and
config) are copied to the asset directory, which ``conf/model/digits_teacher.yaml`` loads
(the teacher of the main job, ``experiment=digits_fdistill``).
The script then measures the teacher as ``fdistill distill`` reports it in metrics.json (2,000 class-balanced
DPM-Solver++(2M) samples, 20 Karras steps in [0.002, 80], seed 2: digits FD, class TV, within-class std) and writes
that with the command, steps, parameter count and bytes to ``record.json`` beside the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fdistill.commands.distill import EVAL_SAMPLES, balanced_digit_metrics, teacher_samples
from fdistill.config import build_run, compose
from fdistill.denoisers.io import load_denoiser
from fdistill.networks import DIGITS_TEACHER_DIR

RECORD_FILE = "record.json"


def train_command(steps: int, run_dir: Path) -> list[str]:
    """The ``fdistill train`` command line of the teacher."""
    return [sys.executable, "-m", "fdistill.cli", "train", "experiment=digits_teacher", "model=digits_small_unet",
            f"train.steps={steps}", f"train.run_dir={run_dir}", "train.sample_every=0"]


def teacher_metrics(model_dir: Path) -> dict[str, float]:
    """The teacher's metrics exactly as ``fdistill distill`` computes them, for the model directory ``model_dir``."""
    overrides = ["experiment=digits_fdistill", "model=pretrained", f"model.path_or_hub_id={model_dir}"]
    spec = compose(overrides)
    method = build_run(spec, with_loggers=False).method
    return balanced_digit_metrics(teacher_samples(method, EVAL_SAMPLES, torch.Generator().manual_seed(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500, help="training steps (batch 128)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/digits_teacher_asset"))
    parser.add_argument("--out", type=Path, default=DIGITS_TEACHER_DIR, help="where the model directory goes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = train_command(args.steps, args.run_dir)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    train_seconds = time.perf_counter() - started
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.run_dir / "model", args.out)
    weights = sorted(args.out.rglob("*.safetensors"))
    denoiser = load_denoiser(args.out)[0]
    record = {"command": " ".join(["fdistill", *command[3:]]), "steps": args.steps, "train_seconds": train_seconds,
              "parameters": sum(p.numel() for p in denoiser.parameters()),
              "weight_bytes": sum(path.stat().st_size for path in weights),
              "teacher_dpmpp_2m_20_steps": teacher_metrics(args.out)}
    (args.out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
