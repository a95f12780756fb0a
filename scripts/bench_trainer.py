"""Trainer overhead and the digits teacher.

1. Steps/s of ``fdistill.training.Trainer`` (its real per-step path: data loader, per-step seeding, micro-batch
   split, loss, backward, clipping, AdamW, LR schedule) against a bare PyTorch loop doing the same forward /
   backward / clip / AdamW step on the same tiny class-conditional UNet and batch size. Timing blocks alternate
   (bare, trainer, trainer, bare, ...) so machine-load drift hits both equally; the ratio is the median over blocks.
2. ``fdistill train experiment=digits_teacher`` (trained on the digits train split): wall time, held-out EDM loss on
   the test split (fixed sigma / noise draws), and digits FD of DPM-Solver++(2M) 20-step samples (EMA weights).

Prints a markdown table and writes ``benchmarks/trainer.json``.
    python scripts/bench_trainer.py            # full: the experiment's teacher steps
    python scripts/bench_trainer.py --quick    # 8 timing blocks, 800 teacher steps, 1000 FD samples
    python scripts/bench_trainer.py --teacher-run runs/digits_teacher   # evaluate an existing run, no training
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fdistill.data import digits
from fdistill.methods.base import StepContext
from fdistill.methods.denoising import DenoisingConfig, build
from fdistill.networks import tiny_unet
from fdistill.training import Trainer
from fdistill.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
LR = 1e-3


def bare_step_fn(seed: int):
    """A plain PyTorch loop on its own tiny UNet: EDM loss (ln sigma ~ N(-1.2, 1.2^2)), backward, clip 1, AdamW."""
    torch.manual_seed(seed)
    net = tiny_unet(num_classes=10)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    images, labels = (torch.stack([s[k] for s in digits(split="train").dataset]) for k in ("x", "label"))

    def step(_: int) -> None:
        index = torch.randint(len(images), (BATCH,))
        x0, y = images[index], labels[index]
        sigma = (-1.2 + 1.2 * torch.randn(BATCH)).exp()
        x0_hat = net(x0 + sigma[:, None, None, None] * torch.randn_like(x0), sigma, y)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        loss = (weight * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_step_fn(seed: int, run_dir: Path):
    """The Trainer's loop body (``fit``: next batch, train_step, bookkeeping) on the same network and settings."""
    torch.manual_seed(seed)
    data = digits(split="train")
    method = build(DenoisingConfig(lr=LR), tiny_unet(num_classes=10), data)
    config = TrainConfig(steps=10 ** 9, batch_size=BATCH, log_every=10 ** 9, checkpoint_every=10 ** 9,
                         run_dir=str(run_dir), device="cpu", progress=False, export=False)
    trainer = Trainer(method, data, config)
    batches = data.loader(BATCH, seed=seed)
    started = time.perf_counter()

    def step(index: int) -> None:
        logs = trainer.train_step(index, next(batches))
        trainer.step = index + 1
        trainer._after_step(logs, started, 0)

    return step


def time_block(step, first: int, num: int) -> float:
    start = time.perf_counter()
    for index in range(first, first + num):
        step(index)
    return num / (time.perf_counter() - start)


def bench_overhead(blocks: int, block_steps: int, run_dir: Path) -> dict:
    """Alternating timing blocks (ABBA order); returns steps/s medians and the median per-pair ratio."""
    runners = {"bare": bare_step_fn(0), "trainer": trainer_step_fn(0, run_dir)}
    counters = {name: 0 for name in runners}
    for name, step in runners.items():  # warm-up (allocator, first-call costs)
        time_block(step, 0, 5)
        counters[name] = 5
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for block in range(blocks):
        order = ("bare", "trainer") if block % 2 == 0 else ("trainer", "bare")
        for name in order:
            rates[name].append(time_block(runners[name], counters[name], block_steps))
            counters[name] += block_steps
    ratios = [t / b for t, b in zip(rates["trainer"], rates["bare"])]
    return {"bare_steps_per_s": statistics.median(rates["bare"]),
            "trainer_steps_per_s": statistics.median(rates["trainer"]),
            "trainer_over_bare": statistics.median(ratios), "ratios": ratios,
            "blocks": blocks, "block_steps": block_steps, "batch_size": BATCH}


def train_teacher(run_dir: Path, steps: int | None, threads: int) -> float:
    """Run ``fdistill train experiment=digits_teacher`` (train split) in a subprocess; returns its wall seconds."""
    overrides = ["experiment=digits_teacher", "data.split=train", f"train.run_dir={run_dir}", "train.progress=false"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "fdistill.cli", "train", *overrides], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def held_out_loss(denoiser, seed: int = 0, repeats: int = 8) -> float:
    """EDM loss (weights of EDM Eq. 8) of ``denoiser`` on the digits test split, fixed seeded draws."""
    test = digits(split="test")
    batch = {k: torch.stack([s[k] for s in test.dataset]) for k in ("x", "label")}
    method = build(DenoisingConfig(), denoiser, test)
    torch.manual_seed(seed)
    with torch.no_grad():
        losses = [method.loss("model", batch, StepContext(step=0, training=False))[0] for _ in range(repeats)]
    return torch.stack(losses).mean().item()


def evaluate_teacher(run_dir: Path, num_samples: int) -> dict:
    """Held-out loss and digits FD of ``num_samples`` DPM-Solver++(2M) 20-step samples (labels cycle 0..9)."""
    from fdistill import samplers
    from fdistill.denoisers import load_denoiser
    from fdistill.evaluation import digits_fd

    denoiser, _ = load_denoiser(run_dir / "model")
    schedule = samplers.sigmas("karras", 20, denoiser.sigma_min, denoiser.sigma_max)
    noise = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * schedule[0]
    with torch.no_grad():
        images = samplers.sample(denoiser, noise, schedule, solver="dpmpp_2m", cond=torch.arange(num_samples) % 10)
    return {"held_out_loss": held_out_loss(denoiser), "digits_fd": digits_fd(images.clamp(-1, 1)),
            "fd_samples": num_samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing blocks, 800 teacher steps")
    parser.add_argument("--teacher-run", type=Path, help="evaluate this finished digits_teacher run instead of training")
    parser.add_argument("--teacher-seconds", type=float, help="wall time of --teacher-run, for the table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads (1: on a shared 2-core machine 2 threads oversubscribe, 5x slower)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "trainer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = ROOT / "runs" / "bench_trainer"
    overhead = bench_overhead(blocks=8 if args.quick else 16, block_steps=20 if args.quick else 40,
                              run_dir=work / "overhead")
    teacher_steps = 800 if args.quick else None
    if args.teacher_run is None:
        run_dir = work / "digits_teacher"
        seconds = train_teacher(run_dir, teacher_steps, args.threads)
    else:
        run_dir, seconds = args.teacher_run, args.teacher_seconds
    last_log = json.loads(Path(run_dir, "metrics.jsonl").read_text().splitlines()[-1])
    teacher = {"run_dir": str(run_dir), "wall_s": seconds, "steps": last_log["step"],
               **evaluate_teacher(run_dir, 1000 if args.quick else 2000)}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {args.threads} torch thread(s)",
              "torch": torch.__version__, "quick": args.quick, "overhead": overhead, "digits_teacher": teacher}
    print("| measurement | value |\n|---|---|")
    print(f"| bare PyTorch loop (tiny UNet, batch {BATCH}) | {overhead['bare_steps_per_s']:.2f} steps/s |")
    print(f"| fdistill Trainer, same step | {overhead['trainer_steps_per_s']:.2f} steps/s |")
    print(f"| Trainer / bare (median of {overhead['blocks']} alternating blocks) | {overhead['trainer_over_bare']:.3f} |")
    wall = "n/a" if seconds is None else f"{seconds / 60:.1f} min"
    print(f"| digits_teacher ({teacher['steps']} steps) wall time | {wall} |")
    print(f"| digits_teacher held-out EDM loss (test split) | {teacher['held_out_loss']:.4f} |")
    print(f"| digits_teacher digits FD ({teacher['fd_samples']} DPM-Solver++(2M) 20-step samples) | {teacher['digits_fd']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
