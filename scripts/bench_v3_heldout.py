"""DPM-Solver-v3 on mixtures the sampler benchmark never used: is it >= 20 % ahead of Diffusers' best at NFE 5-10
there too, and what do the EMS size and the calibration change?

scripts/bench_samplers.py's mixtures are seed 0 of two families (8 components in 16-D, stds U[0.3, 0.6] "mild" and
U[0.02, 0.1] "stiff"); the solver's choices were made on them. This script draws seeds 1-4 of both families and runs,
on the same settings (Karras and log-SNR sigmas over Stable Diffusion's range, NFE 4-20, 128 starts of seed 1, median
L2 error to a 1500-NFE solve):
- ``v3 EMS 256``: DPM-Solver-v3 with the step-count defaults and EMS from 256 samples (the benchmark's earlier size);
- ``v3``: the same with 4096 samples (the authors' size, bench_samplers' now);
- ``v3 calibrated``: that EMS with the variant calibrated per schedule and NFE on 128 other starts (seed 3);
- ``v3 no EMS``: the step-count defaults with the neutral statistics (l = 1, s = b = 0: DPM-Solver++ with v3's
  corrector), to see what the EMS add;
- Diffusers' DPM-Solver++ 2M / 3M, UniPC bh1 / bh2 (p = 2, 3) and DEIS (p = 2, 3) on the same sigmas: the best one.

    OMP_NUM_THREADS=1 python scripts/bench_v3_heldout.py        # about 3 minutes on one core
Writes benchmarks/samplers_v3_heldout.json and .md (the tables, also printed).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench_samplers import BUDGETS, DIFFUSERS, SCHEDULES, calibrated_ems, run_diffusers, teacher_ems
from bench_samplers_teachers import BATCH, DIM, SIGMA_MAX, SIGMA_MIN, mixture_teacher
from fdistill.samplers import sample, sigmas

FAMILIES = {"mild": (0.3, 0.6), "stiff": (0.02, 0.1)}
SEEDS = (1, 2, 3, 4)                   # seed 0 is the sampler benchmark's mixture
SMALL_EMS = 256
GOAL_BUDGETS = (5, 6, 8, 10)
METHODS = ("v3 EMS 256", "v3", "v3 calibrated", "v3 no EMS")


def run_mixture(family: str, seed: int) -> list[dict]:
    """Rows (schedule, budget, method, median error) of one mixture, plus the calibrated variant per setting."""
    teacher, exact = mixture_teacher(FAMILIES[family], seed=seed)
    noise = SIGMA_MAX * torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth, _ = exact(noise)
    small, ems = teacher_ems(teacher, DIM, SMALL_EMS), teacher_ems(teacher, DIM)
    calibrated, report = calibrated_ems(teacher, DIM, ems)
    statistics = dict(zip(METHODS, (small, ems, calibrated, None)))
    rows = []
    for kind in SCHEDULES:
        for budget in BUDGETS:
            schedule = sigmas(kind, budget, SIGMA_MIN, SIGMA_MAX)
            outputs = {label: sample(teacher, noise, schedule, "dpm_solver_v3", ems=stats)
                       for label, stats in statistics.items()}
            outputs.update({label: run_diffusers(teacher, make, into_zero, noise, schedule)
                            for label, (make, into_zero) in DIFFUSERS.items()})
            for label, out in outputs.items():
                rows.append(dict(family=family, seed=seed, schedule=kind, budget=budget, method=label,
                                 median_error=(out - truth).norm(dim=1).median().item(),
                                 variant=report[kind][str(budget)]["variant"] if label == "v3 calibrated" else None))
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per setting: the v3 rows' errors and how far ahead of Diffusers' best; goal counts; EMS-size ratios."""
    settings = []
    for key in dict.fromkeys((r["family"], r["seed"], r["schedule"], r["budget"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["family"], r["seed"], r["schedule"], r["budget"]) == key}
        best = min((m for m in group if m.startswith("diffusers")), key=lambda m: group[m]["median_error"])
        entry = dict(zip(("family", "seed", "schedule", "budget"), key), diffusers=best,
                     diffusers_error=group[best]["median_error"], variant=group["v3 calibrated"]["variant"])
        for method in METHODS:
            entry[method] = group[method]["median_error"]
            entry[f"{method} ahead"] = 1 - group[method]["median_error"] / group[best]["median_error"]
        settings.append(entry)
    goal = [s for s in settings if s["budget"] in GOAL_BUDGETS]
    met = {method: {family: sum(s[f"{method} ahead"] >= 0.2 for s in goal if s["family"] == family)
                    for family in FAMILIES} for method in METHODS}
    ems_size = {budget: math.exp(sum(math.log(s["v3"] / s["v3 EMS 256"]) for s in settings if s["budget"] == budget)
                                 / sum(s["budget"] == budget for s in settings)) for budget in BUDGETS}
    changed = [s["v3 calibrated"] / s["v3"] for s in settings if s["variant"] != "default"]
    calibration = dict(settings=len(settings), changed=len(changed), better=sum(r < 1 for r in changed),
                       best_ratio=min(changed, default=1.0), worst_ratio=max(changed, default=1.0))
    return dict(settings=settings, goal_met=met, goal_settings_per_family=len(goal) // len(FAMILIES),
                ems_4096_over_256_geometric_mean=ems_size, calibration_effect=calibration)


def report(summary: dict) -> str:
    total = summary["goal_settings_per_family"]
    lines = [f"\n#### Held-out mixtures (seeds {SEEDS[0]}-{SEEDS[-1]}): settings at NFE 5-10 where v3 is >= 20 % ahead "
             f"of Diffusers' best (of {total} per family)\n", "| method | " + " | ".join(FAMILIES) + " |",
             "|---|---|---|"]
    lines += [f"| {method} | " + " | ".join(str(count) for count in by_family.values()) + " |"
              for method, by_family in summary["goal_met"].items()]
    effect, ratios = summary["calibration_effect"], summary["ems_4096_over_256_geometric_mean"]
    lines += [f"\nThe calibration chose another variant than the defaults in {effect['changed']} of "
              f"{effect['settings']} settings (NFE 4-20): more accurate in {effect['better']} of them; error "
              f"x{effect['best_ratio']:.2f} to x{effect['worst_ratio']:.2f} of the defaults'."]
    lines += ["\n#### EMS from 4096 samples / from 256: geometric mean of v3's error over the 8 mixtures and 2 "
              "schedules\n", "| NFE | " + " | ".join(str(b) for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS),
              "| ratio | " + " | ".join(f"{ratio:.2f}" for ratio in ratios.values()) + " |"]
    lines += ["\n#### Every setting at NFE 5-10 (median L2 error; % = ahead of Diffusers' best)\n",
              "| mixture | schedule | NFE | v3 EMS 256 | v3 | v3 calibrated (variant) | v3 no EMS | Diffusers best "
              "| error |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['family']} {s['seed']} | {s['schedule']} | {s['budget']} | {s['v3 EMS 256']:.2e} "
              f"({100 * s['v3 EMS 256 ahead']:.0f} %) | {s['v3']:.2e} ({100 * s['v3 ahead']:.0f} %) | "
              f"{s['v3 calibrated']:.2e} ({100 * s['v3 calibrated ahead']:.0f} %, {s['variant']}) | "
              f"{s['v3 no EMS']:.2e} ({100 * s['v3 no EMS ahead']:.0f} %) | {s['diffusers']} | "
              f"{s['diffusers_error']:.2e} |"
              for s in summary["settings"] if s["budget"] in GOAL_BUDGETS]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/samplers_v3_heldout.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, rows = time.time(), []
    for family in FAMILIES:
        for seed in SEEDS:
            rows += run_mixture(family, seed)
            print(f"{family} mixture {seed}: done after {time.time() - start:.0f} s", flush=True)
    summary = summarise(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(rows=rows, **summary, seconds=round(time.time() - start, 1)), indent=1))
    Path(args.out).with_suffix(".md").write_text(report(summary) + "\n")
    print(report(summary))
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
