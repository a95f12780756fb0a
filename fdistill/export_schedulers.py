"""The schedulers with which exported Diffusers pipelines generate like fdistill's one- / few-step generators, and
the integer timesteps of a generator's noise levels (Diffusers pipelines take integer timesteps or flow times)."""
from __future__ import annotations

from typing import Any

import torch


def integer_timesteps(schedule: Any, sigmas: tuple[float, ...]) -> list[int]:
    """UNet timesteps of ``sigmas`` under a DDPM ``schedule`` (``DiffusersDenoiser.schedule``); ValueError (listing
    the grid sigmas of the nearest timesteps) unless every sigma is a grid sigma: Diffusers pipelines only take
    integer timesteps."""
    device = schedule.log_sigmas.device
    fractional = schedule.timestep(torch.tensor(sigmas, dtype=torch.float64, device=device)).double().cpu()
    nearest = fractional.round()
    if (fractional - nearest).abs().max() > 1e-3:
        grid = [round(float(s), 5) for s in schedule.sigma_at(nearest.long())]
        raise ValueError(f"method.generator_sigmas={list(sigmas)} are not noise levels of the UNet's timesteps; the "
                         f"nearest are timesteps {nearest.long().tolist()}: method.generator_sigmas={grid}")
    return nearest.long().tolist()


def one_step_scheduler(scheduler: Any):
    """A DDIMScheduler for one-step generators: with ``num_inference_steps=1`` its only timestep is T - 1
    ("trailing" spacing) and it returns the UNet's x0 prediction at the initial latents (alpha_prev = 1), i.e. the
    generator G(z) = x0(z, T - 1) with z ~ N(0, I) the pipeline's initial latents."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False)


def few_step_scheduler(scheduler: Any):
    """An LCMScheduler for few-step generators: at each timestep passed to the pipeline (``pipe(...,
    timesteps=[t_1, ..., t_K])``) it takes the UNet's x0 prediction and re-noises it to the next timestep with fresh
    noise, the chain x_{k+1} = G(x_k) + noise of ``fdistill.samplers.generator_sample`` (its boundary-condition skip
    term c_skip = 0.25 / ((10 t)^2 + 0.25) is below 1e-5 for t >= 20)."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler.config)


def flow_generator_scheduler(scheduler: Any, steps: int):
    """The scheduler of an exported one- / few-step flow generator: ``FlowMatchEulerDiscreteScheduler`` with shift 1
    (the generator's times are passed as ``sigmas=`` unshifted) and, for several steps, stochastic sampling: each
    step takes x0 = x_t - t v and re-noises it to the next time, x_t' = (1 - t') x0 + t' eps, the chain of
    ``fdistill.samplers.generator_sample`` in flow units."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=1.0, use_dynamic_shifting=False,
                                                       stochastic_sampling=steps > 1)
