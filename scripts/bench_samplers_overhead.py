"""Per-step solver overhead for scripts/bench_samplers.py: wall time spent outside the network by fdistill's
``sample`` and by Diffusers' schedulers (scale_model_input + step) on the same step count and sample shape."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from diffusers import EDMDPMSolverMultistepScheduler, UniPCMultistepScheduler

from bench_samplers_teachers import SIGMA_MAX, SIGMA_MIN
from fdistill.networks import tiny_unet
from fdistill.samplers import ModelStatistics, sample, sigmas


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


def fdistill_overhead(denoiser, shape, steps: int, solver: str, repeats: int, options: dict) -> float:
    """Seconds per step outside the network for fdistill ``sample`` (best of ``repeats``)."""
    best = math.inf
    schedule = sigmas("karras", steps, SIGMA_MIN, SIGMA_MAX)
    noise = SIGMA_MAX * torch.randn(shape)
    for _ in range(repeats):
        timed = TimedDenoiser(denoiser)
        start = time.perf_counter()
        sample(timed, noise, schedule, solver, **options)
        best = min(best, time.perf_counter() - start - timed.seconds)
    return best / steps


def diffusers_overhead(make: Callable, shape, steps: int, repeats: int, unet=None) -> float:
    """Seconds per step in a Diffusers scheduler (scale_model_input + step), network time excluded.
    With ``unet`` (an EDMPrecond) its raw UNet output is fed; otherwise a cached output (zero-cost network)."""
    best = math.inf
    cached = torch.randn(shape)
    for _ in range(repeats):
        scheduler = make()
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


def per_element_ems(shape, steps: int) -> dict:
    """Non-trivial per-element statistics over the benchmark's lambda range (what a real EMS costs per step)."""
    lambdas = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 121, dtype=torch.float64)
    size = (len(lambdas), *shape[1:])
    return {"ems": ModelStatistics(lambdas, torch.full(size, 0.9), torch.full(size, -0.1), torch.full(size, 0.01))}


UNIPC_3 = ("UniPC bh2 p=3", lambda: UniPCMultistepScheduler(solver_order=3))
# (fdistill label, solver, options(shape, steps), Diffusers label, scheduler factory)
OVERHEAD_PAIRS = [
    ("dpmpp_2m", "dpmpp_2m", None, "EDM DPM-Solver++ 2M", lambda: EDMDPMSolverMultistepScheduler(solver_order=2)),
    ("dpmpp_3m", "dpmpp_3m", None, "EDM DPM-Solver++ 3M", lambda: EDMDPMSolverMultistepScheduler(solver_order=3)),
    ("unipc_bh2", "unipc_bh2", None, *UNIPC_3),
    ("dpm_solver_v3", "dpm_solver_v3", None, *UNIPC_3),
    ("dpm_solver_v3 + EMS", "dpm_solver_v3", per_element_ems, *UNIPC_3),
    ("dc_solver", "dc_solver", lambda shape, steps: {"ratios": [1.05] * steps}, *UNIPC_3),
]


def overhead(steps: int, repeats: int) -> list[dict]:
    rows = []
    unet = tiny_unet(channels=1, resolution=8).eval()
    cases = [("cached output", (64, 1, 8, 8), None), ("cached output", (4, 4, 64, 64), None),
             ("tiny UNet", (64, 1, 8, 8), unet)]
    for network, shape, net in cases:
        for label, solver, options, theirs, make in OVERHEAD_PAIRS:
            cached = torch.randn(shape)
            denoiser = net if net is not None else (lambda x, sigma, cond=None: cached)
            ours = fdistill_overhead(denoiser, shape, steps, solver, repeats, options(shape, steps) if options else {})
            rows.append(dict(network=network, shape=list(shape), solver=label, diffusers=theirs,
                             fdistill_ms_per_step=1e3 * ours,
                             diffusers_ms_per_step=1e3 * diffusers_overhead(make, shape, steps, repeats, net)))
    return rows


def overhead_table(rows: list[dict]) -> str:
    lines = ["\n#### Solver overhead per step (ms, network time excluded; best of repeats)\n",
             "| network | shape | fdistill solver | ms | Diffusers scheduler | ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {'x'.join(map(str, r['shape']))} | {r['solver']} | "
              f"{r['fdistill_ms_per_step']:.3f} | {r['diffusers']} | {r['diffusers_ms_per_step']:.3f} |" for r in rows]
    return "\n".join(lines)
