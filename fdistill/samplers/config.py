"""The multi-step sampler of a run (the ``sampler:`` config section) and the ONE function that turns it into noise
levels for a given denoiser: methods' sample grids, DDO's fakes, ``fdistill sample`` and ``fdistill fid`` all call
``noise_levels``, so a schedule means the same noise levels everywhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoisers.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN
from ..validation import require
from .schedules import SIGMA_SCHEDULES, sigmas

SCHEDULES = tuple(SIGMA_SCHEDULES)


@dataclass
class SamplerConfig:
    """Multi-step sampler used by methods that sample with ``fdistill.samplers`` (e.g. sample grids of a teacher).

    Attributes:
        solver: a solver name of ``fdistill.samplers.SOLVERS`` (checked when the method samples), e.g. 'dpmpp_2m'.
        steps: number of sampling steps (>= 1).
        schedule: sigma schedule: 'karras', 'logsnr' or 'time_uniform'.
        sigma_min: smallest nonzero sigma (> 0); null = the model's own (``denoiser.sigma_min``) or 0.002.
        sigma_max: largest sigma (> sigma_min); null = the model's own (``denoiser.sigma_max``) or 80.
        guidance: classifier-free guidance scale w (1 = no guidance; >= 0).
    """

    solver: str = "dpmpp_2m"
    steps: int = 20
    schedule: str = "karras"
    sigma_min: float | None = None
    sigma_max: float | None = None
    guidance: float = 1.0

    def __post_init__(self):
        require(self.steps >= 1, f"sampler.steps must be >= 1, got {self.steps}")
        require(self.schedule in SCHEDULES, f"sampler.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(self.sigma_min is None or self.sigma_min > 0, f"sampler.sigma_min must be > 0 or null, got {self.sigma_min}")
        require(self.sigma_max is None or self.sigma_max > (self.sigma_min or 0.0),
                f"sampler.sigma_max must be > sampler.sigma_min (and > 0) or null, got {self.sigma_max}")
        require(self.guidance >= 0, f"sampler.guidance must be >= 0, got {self.guidance}")


def as_sampler_config(sampler: SamplerConfig | dict | None) -> SamplerConfig:
    """A method config's ``sampler`` field as a SamplerConfig: the default when null (Hydra fills it from the
    top-level ``sampler`` group), built from a plain dict when the config was made in Python."""
    if sampler is None:
        return SamplerConfig()
    return SamplerConfig(**sampler) if isinstance(sampler, dict) else sampler


def unwrapped(denoiser: Any) -> Any:
    """The model under wrappers that hold it as ``.denoiser`` (classifier-free guidance, NFE counting)."""
    while hasattr(denoiser, "denoiser"):
        denoiser = denoiser.denoiser
    return denoiser


def noise_levels(sampler: SamplerConfig, denoiser: Any = None) -> Tensor:
    """The decreasing noise levels of ``sampler`` for ``denoiser``: [sampler.steps + 1], float64 on the CPU, last 0.

    Range: the config's sigma_min / sigma_max where set, else the model's own (its ``sigma_min`` / ``sigma_max``,
    looked up through wrappers), else EDM's [0.002, 80]. 'time_uniform' for a discrete-time VP model (a Diffusers
    wrapper, whose ``schedule.log_sigmas`` is its table of sigma(t)) is uniform in THAT model's timestep index, with
    alphas_cumprod(t) = 1 / (1 + sigma(t)^2); other models get the continuous VP-SDE's t (Song et al. 2021).
    """
    model = unwrapped(denoiser)
    sigma_min = sampler.sigma_min if sampler.sigma_min is not None else getattr(model, "sigma_min", EDM_SIGMA_MIN)
    sigma_max = sampler.sigma_max if sampler.sigma_max is not None else getattr(model, "sigma_max", EDM_SIGMA_MAX)
    options = {}
    log_sigmas = getattr(getattr(model, "schedule", None), "log_sigmas", None)
    if sampler.schedule == "time_uniform" and log_sigmas is not None:
        options["alphas_cumprod"] = 1 / (1 + torch.exp(2 * log_sigmas.detach().cpu().double()))
    return sigmas(sampler.schedule, sampler.steps, sigma_min, sigma_max, **options)
