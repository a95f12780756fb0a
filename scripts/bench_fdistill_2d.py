"""Benchmark: mode coverage of f-distill on a 2-D Gaussian mixture with unequal mode weights.

Teacher: the exact denoiser of 8 modes on a ring (weights 1..8 / 36, std 0.1, radius 2; ``data=gaussian_mixture
preset=ring8``). Student: a one-step MLP generator. For every divergence and seed: modes covered (a mode holds at
least 20 % of its true share of the samples), TV distance between the student's mode histogram (nearest mode) and the
true weights, precision (share of samples within 3 std of a mode), and the same metrics every ``--eval_every`` steps
(the trajectory shows whether a student has converged). Goal: kl / js cover every mode with lower TV than rkl
(reverse KL is mode-seeking).

    python scripts/bench_fdistill_2d.py                                # rkl, kl, js x 3 seeds, 6,000 steps
    python scripts/bench_fdistill_2d.py --divergences all              # all 7 divergences
    python scripts/bench_fdistill_2d.py --quick                        # rkl, kl, js x 1 seed, 1,500 steps
Writes benchmarks/fdistill_2d.json (after every divergence) and prints a markdown table, one row per divergence.
Students need thousands of steps: at 500 steps every divergence covers 5-6 modes with TV ~0.35 (under-trained).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from fdistill.data import gaussian_mixture
from fdistill.losses.fdistill import DIVERGENCES
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.training import Trainer
from fdistill.training.config import TrainConfig

COVERAGE_SHARE = 0.2      # a mode is covered when it holds >= 20 % of its true share of the samples


def method_config(divergence: str, lr: float = 1e-3) -> FDistillConfig:
    """The 2-D recipe (also conf/experiment/gmm_fdistill.yaml): loguniform sigma in [0.01, 5], MLP networks."""
    network = {"_target_": "fdistill.networks.MLPDenoiser", "dim": 2, "hidden": 64, "depth": 2, "sigma_data": 1.0}
    return FDistillConfig(divergence=divergence, lr=lr, gan_weight=1e-2, student_update_freq=2,
                          sigma_distribution="loguniform", sigma_min=0.01, sigma_max=5.0, generator_sigma=5.0,
                          sigma_data=1.0, head_width=64, network=network)


def mode_metrics(samples: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, std: float) -> dict[str, float]:
    """Coverage, TV of the nearest-mode histogram to the true weights, and precision (within 3 std of a mode)."""
    distances = torch.cdist(samples.double(), means.double())                       # [N, K]
    nearest = distances.argmin(1)
    histogram = torch.bincount(nearest, minlength=len(means)).double() / len(samples)
    covered = int((histogram >= COVERAGE_SHARE * weights).sum())
    precision = float((distances.min(1).values <= 3 * std).double().mean())
    return {"modes_covered": covered, "tv": float(0.5 * (histogram - weights).abs().sum()), "precision": precision,
            "histogram": histogram.tolist()}


def run_steps(method, data, steps: int, batch_size: int, seed: int = 0,
              after_step: Callable[[int], None] | None = None) -> float:
    """``steps`` optimisation steps of the real trainer (no checkpoints or exports); returns the seconds taken by the
    steps (not by ``after_step(steps_done)``, called after every step, e.g. for evaluations during training)."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, data, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, run_dir=run_dir,
                                                    device="cpu", progress=False, export=False))
        batches = data.loader(batch_size, seed=seed)
        seconds = 0.0
        for step in range(steps):
            started = time.perf_counter()
            trainer.train_step(step, next(batches))
            seconds += time.perf_counter() - started
            if after_step is not None:
                after_step(step + 1)
        return seconds


def train_2d(divergence: str, seed: int, steps: int, batch_size: int = 256, num_eval: int = 4000,
             eval_every: int = 0):
    """Train one student; returns (method, metrics dict). With ``eval_every`` > 0 the metrics also hold
    ``trajectory``: [step, modes covered, TV, precision] every ``eval_every`` steps (same evaluation noise)."""
    torch.manual_seed(seed)
    data = gaussian_mixture(preset="ring8", dim=2, num_samples=20000, seed=seed)
    method = build(method_config(divergence), None, data)
    teacher = data.extras["denoiser"]

    def evaluate() -> dict[str, float]:
        samples = method.generate(num_eval, torch.Generator().manual_seed(1000 + seed))
        return mode_metrics(samples, teacher.means, teacher.weights, float(teacher.stds[0, 0]))

    trajectory = []

    def record(step: int) -> None:
        if eval_every and step % eval_every == 0:
            m = evaluate()
            trajectory.append([step, m["modes_covered"], round(m["tv"], 4), round(m["precision"], 4)])

    seconds = run_steps(method, data, steps, batch_size, seed, after_step=record)
    return method, {**evaluate(), "seconds": seconds, **({"trajectory": trajectory} if eval_every else {})}


def summarise(runs: list[dict]) -> dict[str, float]:
    """Means over seeds, the fewest modes covered and the largest TV."""
    keys = ("modes_covered", "tv", "precision", "seconds")
    means = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    return means | {"min_modes_covered": min(r["modes_covered"] for r in runs), "max_tv": max(r["tv"] for r in runs)}


def previous_results(out: Path, steps: int, seeds: list[int], eval_every: int) -> dict:
    """The per-divergence results of an earlier run in ``out`` if it used the same settings, else {}."""
    if not out.exists():
        return {}
    previous = json.loads(out.read_text())
    same = (previous.get("steps"), previous.get("seeds"), previous.get("eval_every")) == (steps, seeds, eval_every)
    return previous.get("results", {}) if same else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1,500 steps")
    parser.add_argument("--divergences", default="rkl,kl,js",
                        help=f"comma-separated subset of {','.join(DIVERGENCES)}, or 'all'")
    parser.add_argument("--steps", type=int, default=None, help="training steps per student (default 6000)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per divergence (default 3)")
    parser.add_argument("--eval_every", type=int, default=1500, help="steps between trajectory points (0 = off)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/fdistill_2d.json")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the divergences already in --out that ran with the same steps, seeds and eval_every "
                             "(finish an interrupted run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    divergences = DIVERGENCES if args.divergences == "all" else tuple(args.divergences.split(","))
    for name in divergences:
        if name not in DIVERGENCES:
            parser.error(f"--divergences: unknown {name!r}; allowed: {', '.join(DIVERGENCES)} or all")
    steps = args.steps or (1500 if args.quick else 6000)
    seeds = range(args.seeds or (1 if args.quick else 3))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results = previous_results(out, steps, list(seeds), args.eval_every) if args.keep else {}
    print("| divergence | modes covered (of 8, mean / min) | TV to true weights (mean / max) | precision (3 std) | s / run |")
    print("|---|---|---|---|---|", flush=True)
    for divergence in divergences:
        if divergence in results:
            print(f"| {divergence} | (kept from {out}) |", flush=True)
            continue
        runs = [train_2d(divergence, seed, steps, eval_every=args.eval_every)[1] for seed in seeds]
        results[divergence] = {"mean": summarise(runs), "runs": runs}
        m = results[divergence]["mean"]
        print(f"| {divergence} | {m['modes_covered']:.2f} / {m['min_modes_covered']} | {m['tv']:.3f} / {m['max_tv']:.3f} | "
              f"{m['precision']:.3f} | {m['seconds']:.0f} |", flush=True)
        # written after every divergence, so an interrupted run keeps what it finished
        out.write_text(json.dumps({"benchmark": "fdistill_2d", "data": "ring8 (weights 1..8, std 0.1, radius 2)",
                                   "steps": steps, "batch_size": 256, "eval_every": args.eval_every, "seeds": list(seeds),
                                   "quick": args.quick, "machine": machine, "results": results}, indent=2))
    if {"rkl", "kl", "js"} <= set(results):
        rkl_tv = results["rkl"]["mean"]["tv"]
        goal = {name: results[name]["mean"]["min_modes_covered"] == 8 and results[name]["mean"]["tv"] < rkl_tv
                for name in ("kl", "js")}
        print(f"\ngoal (every seed covers all 8 modes and mean TV below rkl's): {goal}")
        payload = json.loads(out.read_text()) | {"goal_met": goal}
        out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
