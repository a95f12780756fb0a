"""Benchmark: mode coverage of f-distill on a 2-D Gaussian mixture with unequal mode weights.

Teacher: the exact denoiser of 8 modes on a ring (weights 1..8 / 36, std 0.1, radius 2; ``data=gaussian_mixture
preset=ring8``). Student: a one-step MLP generator. For every divergence and seed: modes covered (a mode holds at
least 20 % of its true share of the samples), TV distance between the student's mode histogram (nearest mode) and the
true weights, precision (share of samples within 3 std of a mode). Goal: kl / js cover every mode with lower TV than
rkl (reverse KL is mode-seeking).

    python scripts/bench_fdistill_2d.py            # 7 divergences x 3 seeds
    python scripts/bench_fdistill_2d.py --quick    # rkl, kl, js x 2 seeds, fewer steps
Writes benchmarks/fdistill_2d.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

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


def run_steps(method, data, steps: int, batch_size: int, seed: int = 0) -> float:
    """``steps`` optimisation steps of the real trainer (no checkpoints or exports); returns the seconds taken."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, data, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, run_dir=run_dir,
                                                    device="cpu", progress=False, export=False))
        batches = data.loader(batch_size, seed=seed)
        started = time.perf_counter()
        for step in range(steps):
            trainer.train_step(step, next(batches))
        return time.perf_counter() - started


def train_2d(divergence: str, seed: int, steps: int, batch_size: int = 256, num_eval: int = 4000):
    """Train one student; returns (method, metrics dict)."""
    torch.manual_seed(seed)
    data = gaussian_mixture(preset="ring8", dim=2, num_samples=20000, seed=seed)
    method = build(method_config(divergence), None, data)
    seconds = run_steps(method, data, steps, batch_size, seed)
    teacher = data.extras["denoiser"]
    samples = method.generate(num_eval, torch.Generator().manual_seed(1000 + seed))
    metrics = mode_metrics(samples, teacher.means, teacher.weights, float(teacher.stds[0, 0]))
    return method, {**metrics, "seconds": seconds}


def summarise(runs: list[dict]) -> dict[str, float]:
    keys = ("modes_covered", "tv", "precision", "seconds")
    return {k: sum(r[k] for r in runs) / len(runs) for k in keys} | {"min_modes_covered": min(r["modes_covered"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rkl, kl, js; 2 seeds; 600 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/fdistill_2d.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    divergences = ("rkl", "kl", "js") if args.quick else DIVERGENCES
    steps = args.steps or (600 if args.quick else 1500)
    seeds = range(args.seeds or (2 if args.quick else 3))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results = {}
    for divergence in divergences:
        runs = [train_2d(divergence, seed, steps)[1] for seed in seeds]
        results[divergence] = {"mean": summarise(runs), "runs": runs}
        print(f"{divergence}: {results[divergence]['mean']}", flush=True)
        # written after every divergence, so an interrupted run keeps what it finished
        out.write_text(json.dumps({"benchmark": "fdistill_2d", "data": "ring8 (weights 1..8, std 0.1, radius 2)",
                                   "steps": steps, "batch_size": 256, "seeds": list(seeds), "quick": args.quick,
                                   "machine": machine, "results": results}, indent=2))
    print("\n| divergence | modes covered (of 8, mean / min) | TV to true weights | precision (3 std) | s / run |")
    print("|---|---|---|---|---|")
    for divergence, result in results.items():
        m = result["mean"]
        print(f"| {divergence} | {m['modes_covered']:.2f} / {m['min_modes_covered']} | {m['tv']:.3f} | "
              f"{m['precision']:.3f} | {m['seconds']:.0f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
