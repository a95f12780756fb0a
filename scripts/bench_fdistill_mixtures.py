"""Benchmark: f-distill's divergences on a family of random Gaussian mixtures (exact teachers), in 2-D and 8-D.

Mixtures come from ``fdistill.benchmarks.mixtures.random_mixture(seed, dim)`` (3-8 modes, weights spanning 30-60x,
lightest >= 1 %, random positions and widths), mixture seeds 0 .. --mixtures - 1; every mixture is distilled with
each divergence and --seeds training seeds at a fixed step budget (the gmm_fdistill recipe,
``fdistill.benchmarks.fdistill_mixtures.recipe``). Metrics (``mixtures.mode_metrics``): modes covered (a mode holds
>= 25 % of its true share), TV of the nearest-mode histogram to the true weights, precision (share within 4 std of
its nearest mode; the teacher's own samples give the reference). Goals: kl and js cover >= 90 % of all modes and have
lower TV than rkl (mean over seeds) on >= 80 % of the mixtures.

    python scripts/bench_fdistill_mixtures.py --workers 2              # 10 mixtures x 2 seeds x (rkl, kl, js) x (2-D, 8-D)
    python scripts/bench_fdistill_mixtures.py --quick                  # 3 mixtures x 1 seed, 2-D, 1,000 steps (a smoke run)
    python scripts/bench_fdistill_mixtures.py --cold ...               # the recipe before its warm start (before / after)
    python scripts/bench_fdistill_mixtures.py --divergences rkl,kl,js,kl-oracle,js-oracle --first-mixture 100 ...
A divergence name with the suffix ``-oracle`` weights the student by the exact density ratio
(``fdistill.benchmarks.oracle``) in place of the discriminator's: is the estimator what limits it?
Runs use 1 thread each, --workers processes in parallel. Writes benchmarks/fdistill_mixtures.json (after every run;
--keep resumes an interrupted run with the same settings) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
from pathlib import Path

import torch

from fdistill.benchmarks.fdistill_mixtures import COLD_RECIPE, train_on_mixture
from fdistill.benchmarks.mixtures import mode_metrics, random_mixture
from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.losses.fdistill import DIVERGENCES

GOAL_COVERAGE, GOAL_TV_WINS = 0.9, 0.8


ORACLE_SUFFIX = "-oracle"


def run_one(task: tuple[int, int, str, int, int, bool]) -> tuple[str, dict]:
    """One training run in a worker process (1 thread): (dim, mixture seed, divergence, training seed, steps, cold);
    a divergence ending in ORACLE_SUFFIX uses the exact density ratio."""
    torch.set_num_threads(1)
    dim, mixture_seed, divergence, seed, steps, cold = task
    result = train_on_mixture(random_mixture(mixture_seed, dim), divergence.removesuffix(ORACLE_SUFFIX), seed, steps,
                              COLD_RECIPE if cold else None, oracle=divergence.endswith(ORACLE_SUFFIX))
    return run_key(dim, mixture_seed, divergence, seed), result


def run_key(dim: int, mixture_seed: int, divergence: str, seed: int) -> str:
    return f"{dim}d/m{mixture_seed}/{divergence}/s{seed}"


def teacher_precision(dim: int, mixture_seed: int, num: int = 4000) -> float:
    """Precision of the teacher's own samples (the best a student can reach: < 1 in 8-D, where 4 std is not far)."""
    mixture = random_mixture(mixture_seed, dim)
    teacher = GaussianMixtureDenoiser(mixture["means"], mixture["stds"], mixture["weights"])
    samples = teacher.sample(num, torch.Generator().manual_seed(mixture_seed))
    return mode_metrics(samples, mixture["means"], mixture["stds"], mixture["weights"])["precision"]


def summary(runs: dict[str, dict], dims: list[int], mixtures: list[int], divergences: list[str],
            seeds: list[int]) -> dict:
    """Per dim and divergence: covered share of all modes, mean TV, mean precision, and (kl, js) the share of
    mixtures whose seed-mean TV is below rkl's; only mixtures with every run finished count."""
    table: dict = {}
    for dim in dims:
        done = [m for m in mixtures if all(run_key(dim, m, d, s) in runs for d in divergences for s in seeds)]
        if not done:
            continue
        table[f"{dim}d"] = {"mixtures": done, "teacher_precision": sum(teacher_precision(dim, m) for m in done) / len(done)}
        mean_tv = {(m, d): sum(runs[run_key(dim, m, d, s)]["tv"] for s in seeds) / len(seeds)
                   for m in done for d in divergences}
        for d in divergences:
            chosen = [runs[run_key(dim, m, d, s)] for m in done for s in seeds]
            row = {"modes_covered_share": sum(r["modes_covered"] for r in chosen) / sum(r["num_modes"] for r in chosen),
                   "tv": sum(r["tv"] for r in chosen) / len(chosen),
                   "precision": sum(r["precision"] for r in chosen) / len(chosen),
                   "seconds": sum(r["seconds"] for r in chosen) / len(chosen)}
            if d != "rkl" and "rkl" in divergences:
                row["tv_below_rkl_share"] = sum(mean_tv[m, d] < mean_tv[m, "rkl"] for m in done) / len(done)
                row["goal_met"] = (row["modes_covered_share"] >= GOAL_COVERAGE and row["tv_below_rkl_share"] >= GOAL_TV_WINS)
            table[f"{dim}d"][d] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 mixtures x 1 seed, 2-D only, 1,000 steps "
                        "(the 600 warm-up steps and 400 alternating ones)")
    parser.add_argument("--mixtures", type=int, default=None, help="how many mixture seeds (default 10)")
    parser.add_argument("--first-mixture", type=int, default=0, help="the first mixture seed (default 0)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per mixture and divergence (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 2000)")
    parser.add_argument("--dims", default=None, help="comma-separated dimensions (default 2,8)")
    parser.add_argument("--divergences", default="rkl,kl,js",
                        help=f"comma-separated subset of {','.join(DIVERGENCES)}; suffix {ORACLE_SUFFIX} = exact ratio")
    parser.add_argument("--cold", action="store_true",
                        help="the recipe before its warm start (no regression and critic warm-ups, no regression term) "
                             "and before its 5th-step student updates (every second step)")
    parser.add_argument("--workers", type=int, default=2, help="processes in parallel (1 thread each)")
    parser.add_argument("--out", default="benchmarks/fdistill_mixtures.json")
    parser.add_argument("--keep", action="store_true", help="reuse the runs in --out made with the same steps")
    args = parser.parse_args()
    divergences = args.divergences.split(",")
    for name in divergences:
        if name.removesuffix(ORACLE_SUFFIX) not in DIVERGENCES or name == f"rkl{ORACLE_SUFFIX}":
            parser.error(f"--divergences: unknown {name!r}; allowed: {', '.join(DIVERGENCES)}, each but rkl (which "
                         f"has no ratio) also with the suffix {ORACLE_SUFFIX}")
    dims = [int(d) for d in (args.dims or ("2" if args.quick else "2,8")).split(",")]
    mixtures = list(range(args.first_mixture, args.first_mixture + (args.mixtures or (3 if args.quick else 10))))
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    steps = args.steps or (1000 if args.quick else 2000)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    previous = json.loads(out.read_text()) if args.keep and out.exists() else {}
    if previous.get("steps") == steps and previous.get("cold", False) == args.cold:
        runs = previous["runs"]
    tasks = [(dim, m, d, s, steps, args.cold) for dim in dims for m in mixtures for s in seeds for d in divergences
             if run_key(dim, m, d, s) not in runs]
    header = {"benchmark": "fdistill_mixtures", "steps": steps, "batch_size": 256, "dims": dims, "mixtures": mixtures,
              "seeds": seeds, "divergences": divergences, "quick": args.quick, "cold": args.cold,
              "machine": f"{platform.machine()}, 1 thread per run, {args.workers} workers, CPU"}
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for key, result in pool.imap_unordered(run_one, tasks):
            runs[key] = result
            print(f"{key}: covered {result['modes_covered']}/{result['num_modes']}, TV {result['tv']:.3f}, "
                  f"precision {result['precision']:.3f}, {result['seconds']:.0f} s", flush=True)
            out.write_text(json.dumps(header | {"runs": runs}, indent=2))       # an interrupted run keeps its runs
    table = summary(runs, dims, mixtures, divergences, seeds)
    out.write_text(json.dumps(header | {"summary": table, "runs": runs}, indent=2))
    print("\n| dim | divergence | modes covered (share of all) | TV (mean) | TV below rkl (share of mixtures) | "
          "precision (teacher's) | goal met |\n|---|---|---|---|---|---|---|")
    for dim, rows in table.items():
        for d in divergences:
            r = rows[d]
            below = f"{r['tv_below_rkl_share']:.2f}" if "tv_below_rkl_share" in r else "-"
            print(f"| {dim} | {d} | {r['modes_covered_share']:.3f} | {r['tv']:.3f} | {below} | {r['precision']:.3f} "
                  f"({rows['teacher_precision']:.3f}) | {r.get('goal_met', '-')} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
