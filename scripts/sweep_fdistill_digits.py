"""Sweep of the digits f-distill recipe: many ``fdistill distill`` runs side by side, one CPU thread each.

Each variant is a name and Hydra overrides on top of ``experiment=digits_fdistill_exact``; every run writes its own
metrics.json (digits FD, class TV, within-class spread of the one-step generator and of the 20-step teacher), and
this script gathers them into one JSON and a markdown table sorted by FD. Runs that fail or pass --timeout are
listed with their exit code.

    python scripts/sweep_fdistill_digits.py --steps 2500 --jobs 14            # the built-in variants
    python scripts/sweep_fdistill_digits.py --variant lr3e-4 method.lr=3e-4   # one extra variant (repeatable)
Writes benchmarks/fdistill_digits_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPE = "experiment=digits_fdistill_exact"
VARIANTS: dict[str, list[str]] = {
    "js (recipe)": [],
    "rkl": ["method.divergence=rkl"],
    "kl": ["method.divergence=kl"],
    "js lr 3e-4": ["method.lr=3e-4"],
    "js lr 1e-4": ["method.lr=1e-4"],
    "js lr 1e-4 critic lr 1e-3": ["method.lr=1e-4", "method.critic_lr=1e-3"],
    "js student every 5th step": ["method.student_update_freq=5"],
    "js gan 1e-2": ["method.gan_weight=1e-2"],
    "js gan 1e-1": ["method.gan_weight=1e-1"],
    "js lognormal sigma": ["method.sigma_distribution=lognormal", "method.p_mean=-1.2", "method.p_std=1.2"],
    "js sigma_min 0.02": ["method.sigma_min=0.02"],
    "js no ratio bins": ["method.num_ratio_bins=0"],
    "js 2-step 80 then 1": ["method.generator_sigma=null", "method.generator_sigmas=[80.0,1.0]"],
    "js uniform fake-score weight": ["method.fake_score_weighting=x0"],
}


def run_variant(name: str, overrides: list[str], steps: int, root: Path, timeout: float) -> dict:
    """One ``fdistill distill`` run on 1 CPU thread; returns its metrics.json (+ seconds) or its failure."""
    run_dir = root / re.sub(r"[^A-Za-z0-9.-]+", "_", name)      # a path Hydra's override grammar accepts
    command = [sys.executable, "-m", "fdistill.cli", "distill", RECIPE, *overrides, f"train.steps={steps}",
               "train.device=cpu", "train.progress=false", f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        code, tail = done.returncode, done.stderr[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", ""
    seconds = time.perf_counter() - started
    metrics_path = run_dir / "metrics.json"
    if code != 0 or not metrics_path.exists():
        return {"overrides": overrides, "failed": code, "stderr_tail": tail, "seconds": seconds}
    return {"overrides": overrides, "seconds": seconds, **json.loads(metrics_path.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of every run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time (one thread each)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is stopped")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="an extra variant: its name, then its overrides")
    parser.add_argument("--root", type=Path, default=Path("runs/sweep_fdistill_digits"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fdistill_digits_sweep.json"))
    args = parser.parse_args()
    variants = dict(VARIANTS) | {extra[0]: extra[1:] for extra in args.variant}
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in variants]
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; allowed: {list(variants)}")
        variants = {name: variants[name] for name in args.only.split(",")}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(run_variant, name, overrides, args.steps, args.root, args.timeout)
                   for name, overrides in variants.items()}
        results = {name: future.result() for name, future in futures.items()}
    finished = sorted((r["student"]["digits_fd"], name) for name, r in results.items() if "student" in r)
    print(f"| variant ({args.steps} steps) | NFE | digits FD | class TV | within-class std | teacher FD | minutes |")
    print("|---|---|---|---|---|---|---|")
    for _, name in finished:
        s, t = results[name]["student"], results[name]["teacher"]
        print(f"| {name} | {s['nfe']} | {s['digits_fd']:.1f} | {s['class_tv']:.3f} | {s['within_class_std']:.3f} | "
              f"{t['digits_fd']:.2f} | {results[name]['seconds'] / 60:.1f} |")
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | {r['stderr_tail'][-200:]!r} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf

    from fdistill.config import compose
    base = OmegaConf.to_container(compose([RECIPE]).cfg.method, resolve=True)
    args.out.write_text(json.dumps({"benchmark": "fdistill_digits_sweep", "steps": args.steps,
                                    "recipe_method": {k: v for k, v in base.items() if k != "network"},
                                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                               f"{args.jobs} runs at a time, 1 thread each",
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
