"""Benchmark fdistill.samplers: error at a network-evaluation (NFE) budget against an exact reference, next to
Diffusers' DPM-Solver++ 2M / 3M, UniPC bh1 / bh2 and DEIS on the same sigmas, and per-step solver overhead.

Setting. Sigmas span Stable Diffusion's VP schedule (scaled-linear betas: sigma 14.61 -> 0.0292), then a final 0, on
two spacings: Karras (rho = 7) and uniform in log-SNR. Every method gets the same starting noise and sigma list; a
budget of N NFE is N steps for the 1-NFE multistep methods and the largest step count whose NFE fits for the others.
The last step of every list goes from sigma_min to 0, which every method takes as a denoise x0 = D(x, sigma_min), so
the exact answer is D(x(sigma_min), sigma_min) with x(sigma_min) the exact probability-flow ODE solution.

Teachers (exact denoisers, float64; 16-D but digits):
- gaussian: one Gaussian, stds log-spaced 0.05..2; x(sigma_min) in closed form ((x - m) / sqrt(s^2 + sigma^2) is
  constant along the flow).
- mixture_mild / mixture_stiff: 8 components, means ~ N(0, I), stds U[0.3, 0.6] / U[0.02, 0.1] (sharper modes make
  the ODE stiffer at small sigma). x(sigma_min) from singlestep DPM-Solver-3 with 500 log-SNR steps (1500 NFE); its
  distance to a 250-step solve is reported as the reference's own error bound.
- digits: the shipped learned digits teacher (fdistill/assets/digits_teacher: a class-conditional tiny EDM UNet,
  sample k of class k mod 10, 64-D flattened, network in float32); reference as for the mixtures; its table adds
  the digits FD (fdistill.evaluation.digits_fd) of each method's 256 samples.

DPM-Solver-v3 runs without EMS (l = 1, s = b = 0) and with each teacher's EMS (``compute_ems``: 4096 of the
teacher's own samples, the authors' size, 121 lambdas over the sigma range), with the step-count defaults and
calibrated (``calibrate_dpm_solver_v3``: the variant per schedule and NFE chosen on 128 other starts, seed 3, against
a fine solve); a table compares both to Diffusers' best on the mixtures and digits at NFE 5-10 (the issue's goal:
>= 20 % lower error).

DC-Solver (UniPC bh2, order 3, with dynamic compensation): "searched" uses ratios searched for that teacher, schedule
and NFE on 16 other starts (seed 2; ``search_ratios`` on ``reference_trajectory``); "CPR" uses the cascade polynomial
regression fitted on the searches at NFE 5, 8, 10, 20 (NFE 4 extrapolated, 6 and 15 interpolated).

Metric: median over 128 samples (digits: 256) of the per-sample L2 error (the JSON also has the RMS). On a mixture a few
trajectories start near a boundary between modes, where any solver error flips the mode; they dominate the RMS.

Diffusers runs its own scheduler code on the same sigma list (fdistill.samplers.reference). Its DEIS and UniPC bh1
cannot step into sigma = 0 (log 0, and B(h) = -h is infinite: NaN), so they run to sigma_min and then take the same
final denoise as everyone else (same NFE).

    OMP_NUM_THREADS=1 python scripts/bench_samplers.py     # about 20 minutes on one core
    # or in parallel, then combined:
    python scripts/bench_samplers.py --teachers gaussian mixture_mild mixture_stiff --out a.json
    python scripts/bench_samplers.py --teachers digits --no-overhead --no-dc --out b.json
    python scripts/bench_samplers.py --merge a.json b.json      # -> benchmarks/samplers.json
Writes benchmarks/samplers.json and benchmarks/samplers.md (the tables printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from bench_samplers_overhead import overhead, overhead_table
from bench_samplers_tables import accuracy_tables, dc_table, recommendation_table, summary_table, v3_goal_table
from bench_samplers_teachers import (BATCH, DIGITS_BATCH, DIM, SIGMA_MAX, SIGMA_MIN, TEACHERS, LearnedDigitsTeacher,
                                     denoise)
from fdistill.samplers import (CascadeRegression, ModelStatistics, calibrate_dpm_solver_v3, compute_ems, nfe,
                               reference_trajectory, sample, search_ratios, sigmas)
from fdistill.samplers.reference import diffusers_sample

BUDGETS = [4, 5, 6, 8, 10, 15, 20]
SCHEDULES = ["karras", "logsnr"]
DC_TRAIN = 16                   # DC-Solver: starts its ratios are searched on
CPR_BUDGETS = (5, 8, 10, 20)

# label -> (registry solver, options); the unlabelled registry names use their defaults (what `--solver` gives)
FDISTILL = {
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpm_solver_2": ("dpm_solver_2", {}),
    "dpm_solver_3": ("dpm_solver_3", {}),
    "dpmpp_2s": ("dpmpp_2s", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "dpmpp_3m_taylor": ("dpmpp_3m_taylor", {}),
    "unipc_bh1": ("unipc_bh1", {}),
    "unipc_bh2": ("unipc_bh2", {}),
    "unipc_bh1 p=2": ("unipc_bh1", {"order": 2}),
    "unipc_bh2 p=2": ("unipc_bh2", {"order": 2}),
    "unipc_bh2 no corrector": ("unipc_bh2", {"corrector": False}),
    "unipc_bh2 final corrector": ("unipc_bh2", {"final_corrector": True}),
    "unipc_bh1_noise": ("unipc_bh1_noise", {}),
    "unipc_bh2_noise": ("unipc_bh2_noise", {}),
    "unipc_bh1_noise p=2": ("unipc_bh1_noise", {"order": 2}),
    "unipc_bh2_noise p=2": ("unipc_bh2_noise", {"order": 2}),
    "dpm_solver_v3": ("dpm_solver_v3", {}),
}
# DPM-Solver-v3 with the teacher's empirical model statistics (computed once per teacher, see ``teacher_ems``), as
# they are and with the variant calibrated for every schedule and budget (``calibrated_ems``)
V3_WITH_EMS, V3_CALIBRATED = "dpm_solver_v3 + EMS", "dpm_solver_v3 + EMS calibrated"
EMS_SAMPLES, EMS_GRID = 4096, 121
CALIBRATION_SAMPLES, CALIBRATION_SEED = 128, 3
# label -> (scheduler factory, runs into sigma = 0 itself)
DIFFUSERS: dict[str, tuple[Callable, bool]] = {
    "diffusers dpmpp_2m": (lambda: DPMSolverMultistepScheduler(solver_order=2), True),
    "diffusers dpmpp_3m": (lambda: DPMSolverMultistepScheduler(solver_order=3), True),
    "diffusers unipc_bh1 p=2": (lambda: UniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="sigma_min"),
                                False),
    "diffusers unipc_bh2 p=2": (lambda: UniPCMultistepScheduler(solver_type="bh2"), True),
    "diffusers unipc_bh1 p=3": (lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh1",
                                                                final_sigmas_type="sigma_min"), False),
    "diffusers unipc_bh2 p=3": (lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh2"), True),
    "diffusers deis p=2": (lambda: DEISMultistepScheduler(solver_order=2), False),
    "diffusers deis p=3": (lambda: DEISMultistepScheduler(solver_order=3), False),
}


# ------------------------------------------------------------------------------------------------ accuracy


def steps_for_budget(solver: str, budget: int, options: dict) -> int:
    """Largest step count whose NFE (ending at sigma = 0) is within ``budget``; at least 1."""
    steps = 1
    while nfe(solver, steps + 1, **options) <= budget:
        steps += 1
    return steps


def errors(out: torch.Tensor, truth: torch.Tensor, teacher_name: str) -> dict:
    """Median and RMS L2 error; for digits also the digits FD of the samples against the dataset."""
    per_sample = (out - truth).norm(dim=1)
    result = dict(median_error=per_sample.median().item(), rms_error=(out - truth).pow(2).mean().sqrt().item())
    if teacher_name == "digits":
        from fdistill.evaluation.digits import digits_fd
        result["digits_fd"] = digits_fd(out.float().clamp(-1, 1))
    return result


def run_diffusers(teacher, make: Callable, into_zero: bool, noise: torch.Tensor, schedule: torch.Tensor):
    """Diffusers' scheduler on ``schedule``; without ``into_zero`` it stops at sigma_min and the final step is the
    shared denoise (one NFE, as the step it replaces)."""
    if into_zero:
        return diffusers_sample(make(), teacher, noise, schedule)
    return denoise(teacher, diffusers_sample(make(), teacher, noise, schedule[:-1]), SIGMA_MIN)


def teacher_ems(teacher, dim: int, samples: int = EMS_SAMPLES) -> ModelStatistics:
    """The teacher's EMS on a uniform lambda grid over the benchmark's sigma range, from EMS_SAMPLES of its own
    samples (50-step dpmpp_3m from seed 0: not the benchmark's starting noise, which uses seed 1). A float32 network
    (the learned digits teacher) gets compute_ems' lower-precision finite-difference step and ridge."""
    lambdas = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), EMS_GRID, dtype=torch.float64)
    dtype = torch.float32 if isinstance(teacher, LearnedDigitsTeacher) else torch.float64
    return compute_ems(teacher, (dim,), samples, lambdas, dtype=dtype)


def calibrated_ems(teacher, dim: int, ems: ModelStatistics) -> tuple[ModelStatistics, dict]:
    """``ems`` calibrated on every schedule and budget of the benchmark, on CALIBRATION_SAMPLES starts of seed
    CALIBRATION_SEED (not the evaluation starts, seed 1), and {schedule: {str(budget): {"variant": chosen,
    "errors": {variant: median error}}}} behind it."""
    noise = torch.randn(CALIBRATION_SAMPLES, dim, generator=torch.Generator().manual_seed(CALIBRATION_SEED),
                        dtype=torch.float64)
    lists = {(kind, budget): sigmas(kind, budget, SIGMA_MIN, SIGMA_MAX) for kind in SCHEDULES for budget in BUDGETS}
    calibrated, report = calibrate_dpm_solver_v3(teacher, ems, noise, list(lists.values()))
    errors = {kind: {} for kind in SCHEDULES}
    for (kind, budget), schedule in lists.items():
        key = tuple(schedule.tolist())
        errors[kind][str(budget)] = dict(variant=calibrated.calibration[key], errors=report[key])   # JSON keys
    return calibrated, errors


def dc_ratios(teacher, dim: int, kind: str) -> dict[str, dict[int, list[float]]]:
    """DC-Solver ratios per budget: searched on DC_TRAIN starts of seed 2, and from the CPR fitted on CPR_BUDGETS."""
    train = SIGMA_MAX * torch.randn(DC_TRAIN, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    searched = {}
    for budget in BUDGETS:
        schedule = sigmas(kind, budget, SIGMA_MIN, SIGMA_MAX)
        searched[budget] = search_ratios(teacher, train, schedule, reference_trajectory(teacher, train, schedule))
    cpr = CascadeRegression.fit({budget: searched[budget] for budget in CPR_BUDGETS})
    return {"dc_solver searched": searched, "dc_solver CPR": {budget: cpr.ratios(budget) for budget in BUDGETS}}


def accuracy(teacher_name: str, teacher, dim: int, noise: torch.Tensor, truth: torch.Tensor,
             ems: dict[str, ModelStatistics], with_dc: bool = True) -> tuple[list[dict], dict]:
    """Rows of every method at every schedule and budget (``ems``: row label -> statistics of a dpm_solver_v3 row),
    and the DC-Solver ratios used (none without ``with_dc``)."""
    rows, ratios_used = [], {}
    methods = {**FDISTILL, **{label: ("dpm_solver_v3", {"ems": stats}) for label, stats in ems.items()}}
    for kind in SCHEDULES:
        ratios_used[kind] = dc_ratios(teacher, dim, kind) if with_dc else {}
        for budget in BUDGETS:
            dc = {label: ("dc_solver", {"ratios": by_budget[budget]}) for label, by_budget in ratios_used[kind].items()}
            for label, (solver, options) in {**methods, **dc}.items():
                steps = budget if label in dc else steps_for_budget(solver, budget, options)
                out = sample(teacher, noise, sigmas(kind, steps, SIGMA_MIN, SIGMA_MAX), solver, **options)
                rows.append(dict(teacher=teacher_name, schedule=kind, budget=budget, method=label, steps=steps,
                                 nfe=budget if label in dc else nfe(solver, steps, **options),
                                 **errors(out, truth, teacher_name)))
            for label, (make, into_zero) in DIFFUSERS.items():
                out = run_diffusers(teacher, make, into_zero, noise, sigmas(kind, budget, SIGMA_MIN, SIGMA_MAX))
                rows.append(dict(teacher=teacher_name, schedule=kind, budget=budget, method=label, steps=budget,
                                 nfe=budget, **errors(out, truth, teacher_name)))
    return rows, ratios_used


def best_per_setting(rows: list[dict]) -> list[dict]:
    """For every (teacher, schedule, budget): the most accurate fdistill method and Diffusers method."""
    summary = []
    for key in dict.fromkeys((r["teacher"], r["schedule"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["teacher"], r["schedule"], r["budget"]) == key]
        ours = min((r for r in group if not r["method"].startswith("diffusers")), key=lambda r: r["median_error"])
        theirs = min((r for r in group if r["method"].startswith("diffusers")), key=lambda r: r["median_error"])
        summary.append(dict(teacher=key[0], schedule=key[1], budget=key[2], fdistill=ours["method"],
                            fdistill_error=ours["median_error"], diffusers=theirs["method"],
                            diffusers_error=theirs["median_error"], ratio=theirs["median_error"] / ours["median_error"]))
    return summary


def v3_goal(rows: list[dict], calibration: dict) -> list[dict]:
    """DPM-Solver-v3 with EMS (defaults and calibrated) against Diffusers' best on the mixtures and digits at NFE
    5-10 (issue goal: >= 20 % lower error); ``calibration``: teacher -> ``calibrated_ems``' report."""
    result = []
    for teacher in sorted({r["teacher"] for r in rows} & {"mixture_mild", "mixture_stiff", "digits"}):
        for kind in SCHEDULES:
            for budget in (5, 6, 8, 10):
                group = {r["method"]: r["median_error"] for r in rows
                         if (r["teacher"], r["schedule"], r["budget"]) == (teacher, kind, budget)}
                theirs = min((m for m in group if m.startswith("diffusers")), key=group.get)
                ahead = {label: 1 - group[label] / group[theirs] for label in (V3_WITH_EMS, V3_CALIBRATED)}
                result.append(dict(teacher=teacher, schedule=kind, budget=budget, v3_error=group[V3_WITH_EMS],
                                   calibrated_error=group[V3_CALIBRATED],
                                   variant=calibration[teacher][kind][str(budget)]["variant"], diffusers=theirs,
                                   diffusers_error=group[theirs], ahead=ahead[V3_WITH_EMS],
                                   calibrated_ahead=ahead[V3_CALIBRATED], meets_goal=ahead[V3_WITH_EMS] >= 0.2,
                                   calibrated_meets_goal=ahead[V3_CALIBRATED] >= 0.2))
    return result


def best_registry_solver(rows: list[dict], num_teachers: int) -> dict[int, dict]:
    """Per budget, the registry solver with one NFE per step and default options (what ``--solver NAME --steps
    NFE`` runs; dpm_solver_v3 is left out: ``fdistill sample`` runs it only with ``--ems``) with the smallest
    geometric mean of median error over teachers and schedules."""
    names = [label for label, (solver, options) in FDISTILL.items()
             if not options and nfe(solver, 10) == 10 and solver != "dpm_solver_v3"]
    result = {}
    for budget in BUDGETS:
        score = {name: math.exp(sum(math.log(r["median_error"]) for r in rows
                                    if r["budget"] == budget and r["method"] == name)
                                / (num_teachers * len(SCHEDULES))) for name in names}
        best = min(score, key=score.get)
        result[budget] = dict(solver=best, geometric_mean_error=score[best],
                              runner_up=sorted(score, key=score.get)[1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/samplers.json")
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-step overhead timing")
    parser.add_argument("--teachers", nargs="+", choices=list(TEACHERS), default=list(TEACHERS))
    parser.add_argument("--no-dc", action="store_true", help="skip DC-Solver (its ratio search is most of the learned "
                        "digits teacher's run time)")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from --out's JSON")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine runs of disjoint --teachers (e.g. two "
                        "processes in parallel) into --out instead of running")
    args = parser.parse_args()
    if args.render:
        write_report(json.loads(Path(args.out).read_text()), args.out)
        return
    if args.merge:
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        parts = {key: {k: v for run in runs for k, v in run[key].items()}
                 for key in ("reference_max_l2_error", "dc_solver_ratios")}
        result = assemble([row for run in runs for row in run["accuracy"]], parts["reference_max_l2_error"],
                          {k: v for run in runs for k, v in run["ems"]["teachers"].items()}, parts["dc_solver_ratios"],
                          [row for run in runs for row in run["overhead"]], sum(run["seconds"] for run in runs))
        save(result, args.out)
        return
    torch.set_num_threads(1)   # tiny tensors: a second thread only adds contention (the machine is shared)
    start = time.time()
    rows, reference_error, ems_info, ratios = [], {}, {}, {}
    for name in args.teachers:
        build, dim, batch = TEACHERS[name]
        teacher, exact = build()
        noise = SIGMA_MAX * torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        truth, reference_error[name] = exact(noise)
        ems_start = time.time()
        ems = teacher_ems(teacher, dim)
        calibration_start = time.time()
        calibrated, calibration = calibrated_ems(teacher, dim, ems)
        ems_info[name] = dict(seconds=round(calibration_start - ems_start, 2),
                              calibration_seconds=round(time.time() - calibration_start, 2), calibration=calibration)
        teacher_rows, ratios[name] = accuracy(name, teacher, dim, noise, truth,
                                              {V3_WITH_EMS: ems, V3_CALIBRATED: calibrated}, with_dc=not args.no_dc)
        rows += teacher_rows
        print(f"{name}: done after {time.time() - start:.0f} s", flush=True)
    overhead_rows = [] if args.no_overhead else overhead(steps=20, repeats=5)
    save(assemble(rows, reference_error, ems_info, ratios, overhead_rows, time.time() - start), args.out)


def assemble(rows: list[dict], reference_error: dict, ems_info: dict, ratios: dict, overhead_rows: list[dict],
             seconds: float) -> dict:
    """The JSON of a run: its rows and everything derived from them (``ems_info``: teacher -> EMS and calibration
    seconds and the calibration's report)."""
    num_teachers = len({row["teacher"] for row in rows})
    return dict(
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread "
                f"({os.cpu_count()} cores), torch {torch.__version__}",
        sigma_range=f"{SIGMA_MAX} -> {SIGMA_MIN} -> 0", batch=BATCH, dim=DIM, digits_batch=DIGITS_BATCH,
        teachers=dict(gaussian="one Gaussian, stds log-spaced 0.05..2 (closed-form ODE flow)",
                      mixture_mild="8 components, stds U[0.3, 0.6]", mixture_stiff="8 components, stds U[0.02, 0.1]",
                      digits="the shipped learned class-conditional digits teacher (tiny EDM UNet, 8x8, float32)"),
        reference_max_l2_error=reference_error, accuracy=rows, best_per_setting=best_per_setting(rows),
        best_registry_solver_per_budget=best_registry_solver(rows, num_teachers),
        dpm_solver_v3_goal=v3_goal(rows, {name: info["calibration"] for name, info in ems_info.items()}),
        dc_solver_ratios=ratios, ems=dict(samples=EMS_SAMPLES, grid=EMS_GRID, calibration_samples=CALIBRATION_SAMPLES,
                                          teachers=ems_info),
        overhead=overhead_rows, seconds=round(seconds, 1))


def save(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    write_report(result, out)


def write_report(result: dict, out: str) -> None:
    """The markdown tables of a run's ``result`` (the JSON) next to it, and printed."""
    best = {int(budget): value for budget, value in result["best_registry_solver_per_budget"].items()}
    report = (f"machine: {result['machine']}; sigmas {result['sigma_range']}; reference error bound (max L2): "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["reference_max_l2_error"].items())
              + "\n" + summary_table(result["best_per_setting"]) + "\n" + v3_goal_table(result["dpm_solver_v3_goal"])
              + "\n" + dc_table(result["accuracy"]) + "\n" + recommendation_table(best)
              + "\n" + accuracy_tables(result["accuracy"])
              + ("\n" + overhead_table(result["overhead"]) if result["overhead"] else ""))
    Path(out).with_suffix(".md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out} and {Path(out).with_suffix('.md')} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
