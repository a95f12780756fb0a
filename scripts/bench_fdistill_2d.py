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
The recipe is ``fdistill.benchmarks.fdistill_2d.recipe`` (gmm_fdistill's): its first 600 steps are the warm-ups.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fdistill.benchmarks.fdistill_2d import parse_divergences, summarise, train_2d
from fdistill.losses.fdistill import DIVERGENCES


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
    try:
        divergences = parse_divergences(args.divergences)
    except ValueError as error:
        parser.error(f"--divergences: {error}")
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
