"""Benchmark fdistill.samplers: accuracy vs NFE against an exact-teacher ground truth, next to Diffusers'
DPM-Solver++ schedulers, and per-step solver overhead.

Accuracy: a Gaussian-mixture teacher (exact denoiser; sharp modes, a stiff ODE) and a single Gaussian with uneven
stds (smooth; its ODE flow is closed-form). The mixture's ground truth is the probability-flow ODE solved very finely
(singlestep DPM-Solver-3, logSNR steps, float64; its own convergence is checked against a solve with half the steps and
printed). Each solver gets the largest step count whose NFE fits the budget (``fdistill.samplers.nfe``); Diffusers'
multistep schedulers (EDMDPMSolverMultistepScheduler, and DPMSolverMultistepScheduler driven on the same VE sigma list)
run the same sigmas and starting noise. Tables show the median over samples of ||x_solver - x_true||_2; the JSON also
has the RMS over samples and coordinates.

Overhead: seconds per step spent outside the network, (a) with a zero-cost denoiser (a cached output), fdistill's
``sample`` vs a loop of Diffusers' ``scheduler.step``, and (b) with fdistill's tiny EDM UNet, network time measured
around every network call and subtracted.

    python scripts/bench_samplers.py            # full (about 5-8 minutes on 2 CPU cores)
    python scripts/bench_samplers.py --quick    # about a minute
Writes benchmarks/samplers.json and prints markdown tables.
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
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.networks import tiny_unet
from fdistill.samplers import SOLVERS, nfe, sample, sigmas
from fdistill.samplers.reference import diffusers_sample

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ODE_SOLVERS = [name for name in SOLVERS if name != "dpmpp_2m_sde"]      # the SDE has no single exact endpoint
DIFFUSERS = {
    "diffusers_edm_2m": lambda: EDMDPMSolverMultistepScheduler(solver_order=2),
    "diffusers_edm_3m": lambda: EDMDPMSolverMultistepScheduler(solver_order=3),
    "diffusers_vp_2m": lambda: DPMSolverMultistepScheduler(solver_order=2),
    "diffusers_vp_3m": lambda: DPMSolverMultistepScheduler(solver_order=3),
}


def gaussian_teacher(dim: int, seed: int = 0) -> tuple[GaussianMixtureDenoiser, Callable]:
    """One Gaussian, means ~ N(0, I), stds log-spaced in [0.05, 2] (smooth, several time scales), and its exact
    probability-flow map: (x - m) / sqrt(s^2 + sigma^2) is constant along the ODE."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, dim, generator=generator, dtype=torch.float64)
    std = torch.logspace(math.log10(0.05), math.log10(2.0), dim, dtype=torch.float64)[None]
    flow = lambda x: mean + (x - mean) * std / torch.sqrt(std ** 2 + SIGMA_MAX ** 2)     # noqa: E731 (to sigma = 0)
    return GaussianMixtureDenoiser(mean, std), flow


def mixture_teacher(dim: int, components: int, seed: int = 0) -> GaussianMixtureDenoiser:
    """K random means ~ N(0, I), isotropic stds in [0.05, 0.45]: sharp modes make the ODE stiff at small sigma."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=generator, dtype=torch.float64)
    stds = 0.05 + 0.4 * torch.rand(components, generator=generator, dtype=torch.float64)
    return GaussianMixtureDenoiser(means, stds)


def steps_for_budget(solver: str, budget: int) -> int:
    """Largest step count whose NFE (ending at sigma = 0) is within ``budget``; at least 1."""
    steps = 1
    while nfe(solver, steps + 1) <= budget:
        steps += 1
    return steps


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def errors(out: torch.Tensor, truth: torch.Tensor) -> dict:
    """RMS over samples and coordinates, and the median per-sample L2 error. On a mixture a few trajectories start
    near a boundary between modes and any solver error flips their mode; they dominate the RMS, not the median."""
    return dict(rms_error=rms(out, truth), median_error=(out - truth).norm(dim=1).median().item())


def ground_truth(teacher, noise, steps: int) -> tuple[torch.Tensor, float]:
    """Fine float64 DPM-Solver-3 solve and its distance to a solve with half the steps (an error bound)."""
    fine = sample(teacher, noise, sigmas("logsnr", steps, SIGMA_MIN, SIGMA_MAX), "dpm_solver_3")
    half = sample(teacher, noise, sigmas("logsnr", steps // 2, SIGMA_MIN, SIGMA_MAX), "dpm_solver_3")
    return fine, rms(fine, half)


def accuracy(teacher_name, teacher, noise, truth, budgets, schedule_kinds) -> list[dict]:
    rows = []
    for kind in schedule_kinds:
        for budget in budgets:
            for solver in ODE_SOLVERS:
                steps = steps_for_budget(solver, budget)
                out = sample(teacher, noise, sigmas(kind, steps, SIGMA_MIN, SIGMA_MAX), solver)
                rows.append(dict(teacher=teacher_name, schedule=kind, budget=budget, method=solver, steps=steps,
                                 nfe=nfe(solver, steps), **errors(out, truth)))
            for name, make in DIFFUSERS.items():
                out = diffusers_sample(make(), teacher, noise, sigmas(kind, budget, SIGMA_MIN, SIGMA_MAX))
                rows.append(dict(teacher=teacher_name, schedule=kind, budget=budget, method=name, steps=budget,
                                 nfe=budget, **errors(out, truth)))
    return rows


class TimedDenoiser(torch.nn.Module):
    """Adds the wall time of every call of ``denoiser`` to ``.seconds``."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.seconds = denoiser, 0.0

    def forward(self, x, sigma, cond=None):
        start = time.perf_counter()
        out = self.denoiser(x, sigma, cond)
        self.seconds += time.perf_counter() - start
        return out


def fdistill_overhead(denoiser, shape, steps: int, solver: str, repeats: int) -> float:
    """Seconds per step outside the network for fdistill ``sample`` (best of ``repeats``)."""
    best = math.inf
    schedule = sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX)
    noise = SIGMA_MAX * torch.randn(shape)
    for _ in range(repeats):
        timed = TimedDenoiser(denoiser)
        start = time.perf_counter()
        sample(timed, noise, schedule, solver)
        best = min(best, time.perf_counter() - start - timed.seconds)
    return best / steps


def diffusers_overhead(order: int, shape, steps: int, repeats: int, unet=None) -> float:
    """Seconds per step in Diffusers' EDM scheduler (scale_model_input + step), network time excluded.
    With ``unet`` (an EDMPrecond) the raw UNet output is fed; otherwise a cached output (zero-cost network)."""
    best = math.inf
    cached = torch.randn(shape)
    for _ in range(repeats):
        scheduler = EDMDPMSolverMultistepScheduler(solver_order=order)
        scheduler.set_timesteps(steps)
        x = SIGMA_MAX * torch.randn(shape)
        spent = 0.0
        with torch.no_grad():
            for i, timestep in enumerate(scheduler.timesteps):
                start = time.perf_counter()
                x_in = scheduler.scale_model_input(x, timestep)
                spent += time.perf_counter() - start
                raw = cached if unet is None else unet.net(
                    x_in, unet_noise_input(scheduler.sigmas[i].item(), shape[0])).sample
                start = time.perf_counter()
                x = scheduler.step(raw, timestep, x).prev_sample
                spent += time.perf_counter() - start
        best = min(best, spent)
    return best / steps


def unet_noise_input(sigma: float, batch: int) -> torch.Tensor:
    """fdistill's EDMPrecond timestep input, TIMESTEP_SCALE * ln(sigma) / 4 (fdistill/denoisers/edm.py)."""
    from fdistill.denoisers.edm import TIMESTEP_SCALE
    return torch.full((batch,), TIMESTEP_SCALE * math.log(sigma) / 4)


def overhead(steps: int, repeats: int) -> list[dict]:
    rows = []
    unet = tiny_unet(channels=1, resolution=8).eval()
    cases = [("cached output", (64, 1, 8, 8), None), ("cached output", (4, 4, 64, 64), None),
             ("tiny UNet", (64, 1, 8, 8), unet)]
    for network, shape, net in cases:
        for order, solver in ((2, "dpmpp_2m"), (3, "dpmpp_3m")):
            cached = torch.randn(shape)
            denoiser = net if net is not None else (lambda x, sigma, cond=None: cached)
            rows.append(dict(network=network, shape=list(shape), solver=solver,
                             fdistill_ms_per_step=1e3 * fdistill_overhead(denoiser, shape, steps, solver, repeats),
                             diffusers_ms_per_step=1e3 * diffusers_overhead(order, shape, steps, repeats, net)))
    return rows


def accuracy_table(rows, budgets, metric: str) -> str:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lines = []
    for teacher, kind in dict.fromkeys((row["teacher"], row["schedule"]) for row in rows):
        lines += [f"\n{teacher}, {kind} sigmas: {metric} vs the exact ODE solution (NFE budget; actual NFE in "
                  "brackets when lower)\n",
                  "| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method in methods:
            cells = []
            for budget in budgets:
                row = next(r for r in rows if (r["teacher"], r["schedule"], r["budget"], r["method"])
                           == (teacher, kind, budget, method))
                cells.append(f"{row[metric]:.2e}" + ("" if row["nfe"] == budget else f" ({row['nfe']})"))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(rows) -> str:
    lines = ["\nSolver overhead per step (ms, network time excluded; best of repeats)\n",
             "| network | shape | solver | fdistill | diffusers EDM scheduler |", "|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {'x'.join(map(str, r['shape']))} | {r['solver']} | "
              f"{r['fdistill_ms_per_step']:.3f} | {r['diffusers_ms_per_step']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, coarser ground truth, fewer budgets")
    parser.add_argument("--out", default="benchmarks/samplers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)   # tiny tensors: a second thread only adds contention (measured 20x slower under load)
    budgets = [5, 10, 20] if args.quick else [5, 10, 20, 50]
    batch, truth_steps = (64, 300) if args.quick else (128, 1000)
    noise = SIGMA_MAX * torch.randn(batch, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = time.time()
    gaussian, gaussian_flow = gaussian_teacher(dim=16)
    mixture = mixture_teacher(dim=16, components=8)
    truth, truth_error = ground_truth(mixture, noise, truth_steps)
    accuracy_rows = (accuracy("mixture", mixture, noise, truth, budgets, ["karras", "logsnr"])
                     + accuracy("gaussian", gaussian, noise, gaussian_flow(noise), budgets, ["karras", "logsnr"]))
    overhead_rows = overhead(steps=20, repeats=3 if args.quick else 5)
    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread "
                f"({os.cpu_count()} cores), torch {torch.__version__}",
        teachers=dict(mixture="GaussianMixtureDenoiser: 8 components in 16-D, means ~ N(0, I), stds U[0.05, 0.45]",
                      gaussian="one Gaussian in 16-D, means ~ N(0, I), stds log-spaced 0.05..2 (closed-form ODE flow)"),
        sigma_range=f"{SIGMA_MAX} -> {SIGMA_MIN} -> 0",
        mixture_ground_truth=f"dpm_solver_3, {truth_steps} logSNR steps ({3 * truth_steps} NFE), float64; "
                     f"RMS distance to the {truth_steps // 2}-step solve: {truth_error:.2e}",
        batch=batch, quick=args.quick, accuracy=accuracy_rows, overhead=overhead_rows,
        seconds=round(time.time() - start, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}\nteachers: {result['teachers']}\nmixture ground truth: "
          f"{result['mixture_ground_truth']}")
    print(accuracy_table(accuracy_rows, budgets, "median_error"))
    print(overhead_table(overhead_rows))
    print(f"\nwrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
