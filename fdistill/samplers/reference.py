"""Drive Diffusers' multistep schedulers (DPM-Solver++, UniPC, DEIS) with an fdistill denoiser, on an exact sigma list.

Used by the tests and ``scripts/bench_samplers.py`` to compare fdistill's solvers with Diffusers' at equal sigmas,
starting noise and NFE. The scheduler's own sigma list is replaced by ``sigmas`` after ``set_timesteps`` (its step
reads ``scheduler.sigmas[step_index]``; ``set_begin_index(0)`` avoids any lookup by timestep), and the denoiser's x0
is turned into the raw model output the scheduler expects by inverting its output parameterisation.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor


class _EDMAdapter:
    """EDMDPMSolverMultistepScheduler: VE sample (alpha = 1); x0 = c_skip x + c_out F (EDM Eq. 7, epsilon form)."""

    @staticmethod
    def to_scheduler(x: Tensor, sigma: float) -> Tensor:
        return x

    @staticmethod
    def from_scheduler(sample: Tensor, sigma: float) -> Tensor:
        return sample

    @staticmethod
    def model_output(scheduler, x: Tensor, x0: Tensor, sigma: float) -> Tensor:
        sigma_data = scheduler.config.sigma_data
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2)
        return (x0 - c_skip * x) / c_out


class _VPAdapter:
    """VP schedulers with epsilon prediction (DPMSolverMultistepScheduler, UniPCMultistepScheduler,
    DEISMultistepScheduler): VP sample x / sqrt(1 + sigma^2), output (x - x0) / sigma."""

    @staticmethod
    def to_scheduler(x: Tensor, sigma: float) -> Tensor:
        return x / math.sqrt(1 + sigma ** 2)

    @staticmethod
    def from_scheduler(sample: Tensor, sigma: float) -> Tensor:
        return sample * math.sqrt(1 + sigma ** 2)

    @staticmethod
    def model_output(scheduler, x: Tensor, x0: Tensor, sigma: float) -> Tensor:
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"diffusers_sample drives {type(scheduler).__name__} with prediction_type='epsilon', "
                             f"got {scheduler.config.prediction_type!r}")
        return (x - x0) / sigma


ADAPTERS = {"EDMDPMSolverMultistepScheduler": _EDMAdapter, "DPMSolverMultistepScheduler": _VPAdapter,
            "UniPCMultistepScheduler": _VPAdapter, "DEISMultistepScheduler": _VPAdapter}


@torch.no_grad()
def diffusers_sample(scheduler, denoiser: Callable, noise: Tensor, sigmas: Tensor, cond: Any = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Sample with a Diffusers scheduler from ``noise`` (VE, at sigmas[0]) to sigmas[-1]; returns the VE sample.

    ``len(sigmas) - 1`` steps, one denoiser call each. The scheduler's ``final_sigmas_type`` should agree with
    sigmas[-1] ("zero" when it is 0, else "sigma_min"), as it decides Diffusers' last-step order.
    """
    adapter = ADAPTERS.get(type(scheduler).__name__)
    if adapter is None:
        raise ValueError(f"diffusers_sample supports {', '.join(ADAPTERS)}; got {type(scheduler).__name__}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = sigmas
    scheduler.set_begin_index(0)
    options = {} if generator is None else {"generator": generator}      # only the SDE schedulers take one
    sample = adapter.to_scheduler(noise, sigmas[0].item())
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = sigmas[i].item()
        x = adapter.from_scheduler(sample, sigma)
        x0 = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), cond).to(x.dtype)
        output = adapter.model_output(scheduler, x, x0, sigma)
        sample = scheduler.step(output, timestep, sample, **options).prev_sample
    return adapter.from_scheduler(sample, sigmas[-1].item())
