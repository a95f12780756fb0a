"""Diagnostics: is f-distill's density ratio the reason kl / js lose modes? (exact teacher, the issue's five-mode mixture)

Every variant trains the gmm_fdistill recipe (``fdistill.benchmarks.fdistill_mixtures.recipe``) on the five-mode
mixture (weights 70 % .. 2 %) and reports the mode metrics of ``fdistill.benchmarks.mixtures`` (covered: >= 25 % of
its true share; TV; precision within 4 std). Variants:
  disc-<div>           the method as shipped (discriminator ratio); its log r is probed against the oracle's
                       (``fdistill.benchmarks.oracle``) per noise level every --probe_every steps
  oracle-<div>         the exact ratio in place of the discriminator's (same clamps, bins, normalisation)
  exact-<div>          the exact ratio and, in place of the learned fake score, the exact denoiser of the student's
                       samples (``oracle.ExactStudentDenoiser``): a perfect critic
  <ablation>-<div>     one change (first divergence of --divergences only): gan0 (gan_weight 0), lognormal (sigma ~ EDM's log-normal in [0.01, 5]),
                       noclamp (ratio clamps [1e-4, 1e4], logit clamp 20), nobins (no per-bin normalisation),
                       ttur5 (student every 5th step: 4 critic updates per student update, DMD2's two time-scale rule)
  All variants update the student at every second step, as the recipe did when they ran (it now takes the 5th).
  The variants above run the recipe as it was before its warm start (COLD). The warm start (every divergence, rkl too):
  warm-<div>           the recipe: 400 regression-only steps, 200 critic-only steps, then the matching loss with DMD's
                       regression term (lambda 0.25); --steps counts all of them
  warmnoterm / warmnocritic / termonly   (first divergence) the warm start without the regression term after the
                       warm-ups / without the critic-only steps / only the regression term, from a cold start
    python scripts/diagnose_fdistill_ratio.py --workers 2               # all variants, seeds 0 1, 2,000 steps
    python scripts/diagnose_fdistill_ratio.py --steps 600 --seeds 1 --probe_every 300 --workers 4   # what ran
    python scripts/diagnose_fdistill_ratio.py --quick                   # 300 steps, seed 0 (a smoke run)
    python scripts/diagnose_fdistill_ratio.py --variants warm,warmnoterm,warmnocritic,termonly --steps 1200 --seeds 1 \
        --out benchmarks/fdistill_warm_start_diagnostics.json                 # the warm start's ablations
Writes benchmarks/fdistill_ratio_diagnostics.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
from pathlib import Path

import torch

from fdistill.benchmarks.fdistill_mixtures import (COLD_RECIPE, EVERY_SECOND_STEP, FIVE_MODES, PROBE_SIGMAS,
                                                   train_on_mixture)

COLD = COLD_RECIPE                       # the recipe before its warm start: what the ratio diagnostics ran
WARM = EVERY_SECOND_STEP                 # the warm start as its diagnostics ran (student at every second step)
ABLATIONS = {
    "disc": COLD,
    "oracle": COLD,
    "exact": COLD,
    "gan0": COLD | {"gan_weight": 0.0},
    "lognormal": COLD | {"sigma_distribution": "lognormal", "p_mean": -0.4, "p_std": 1.0},
    "noclamp": COLD | {"ratio_min": 1e-4, "ratio_max": 1e4, "logit_clamp": 20.0},
    "nobins": COLD | {"num_ratio_bins": 0},
    "ttur5": COLD | {"student_update_freq": 5},
    "warm": WARM,                                                  # the recipe: its warm start included
    "warmnoterm": WARM | {"regression_weight": 0.0},               # warm-ups without the regression term after them
    "warmnocritic": WARM | {"critic_warmup_steps": 0},             # no critic-only steps
    "termonly": WARM | {"regression_warmup_steps": 0, "critic_warmup_steps": 0},   # the regression term, cold start
}
PER_DIVERGENCE = ("disc", "oracle", "exact", "warm")     # run for every divergence (the others for the first only)


def run_variant(task: tuple[str, str, int, int, int]) -> tuple[str, int, dict]:
    """One training run (in a worker process, 1 thread)."""
    torch.set_num_threads(1)
    variant, divergence, seed, steps, probe_every = task
    result = train_on_mixture(FIVE_MODES, divergence, seed, steps, overrides=ABLATIONS[variant],
                              oracle=variant in ("oracle", "exact"), exact_fake_score=variant == "exact", probe_every=probe_every if variant in ("disc", "oracle") else 0)
    return f"{variant}-{divergence}", seed, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 steps, seed 0")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 2000)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 2)")
    parser.add_argument("--variants", default=",".join(ABLATIONS), help=f"comma-separated subset of {','.join(ABLATIONS)}")
    parser.add_argument("--divergences", default="kl,js",
                        help="divergences of disc and oracle (rkl also runs as disc-rkl); the ablations use the first")
    parser.add_argument("--probe_every", type=int, default=500, help="steps between ratio probes")
    parser.add_argument("--workers", type=int, default=2, help="processes in parallel (1 thread each)")
    parser.add_argument("--out", default="benchmarks/fdistill_ratio_diagnostics.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        if name not in ABLATIONS:
            parser.error(f"--variants: unknown {name!r}; allowed: {', '.join(ABLATIONS)}")
    steps, seeds = args.steps or (300 if args.quick else 2000), range(args.seeds or (1 if args.quick else 2))
    probe_every = min(args.probe_every, steps)
    divergences = args.divergences.split(",")
    tasks = [(v, d, s, steps, probe_every) for v in variants for d in (divergences if v in PER_DIVERGENCE else divergences[:1])
             for s in seeds]
    tasks = [(v, "rkl", s, steps, probe_every) for v in ("disc", "warm") if v in variants for s in seeds] + tasks
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        finished = pool.map(run_variant, tasks, chunksize=1)
    results: dict[str, dict] = {}
    for name, seed, result in finished:
        results.setdefault(name, {})[str(seed)] = result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "fdistill_ratio_diagnostics", "mixture": FIVE_MODES, "steps": steps,
                               "seeds": list(seeds), "probe_sigmas": PROBE_SIGMAS, "variants": ABLATIONS,
                               "machine": f"{platform.machine()}, 1 thread per run, {args.workers} workers, CPU",
                               "results": results}, indent=2))
    print("| variant | seed | modes covered (of 5) | TV | precision | histogram (70/14/10/4/2 %) |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        for seed, r in runs.items():
            shares = " / ".join(f"{100 * h:.0f}" for h in r["histogram"])
            print(f"| {name} | {seed} | {r['modes_covered']} | {r['tv']:.3f} | {r['precision']:.3f} | {shares} |")
    print("\nratio probe at the last step (seed 0): corr / rmse of log r per sigma, and mean |h_disc - h_oracle| (kl)")
    print("| variant | " + " | ".join(f"sigma {s}" for s in PROBE_SIGMAS) + " |\n" + "|---" * (len(PROBE_SIGMAS) + 1) + "|")
    for name, runs in results.items():
        probes = runs.get("0", {}).get("probes")
        if probes:
            cells = [f"{p['corr']:.2f} / {p['rmse']:.2f} / {p['weight_error']:.2f}" for p in probes[-1]["sigmas"]]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
