"""DMD's regression loss (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", Sec. 3.3):
the one-step student G(z) regresses onto the teacher's probability-flow ODE sample from the same noise z.

The (noise, ODE sample) pairs are drawn once from a fixed seed, as DMD precomputes its paired data set, so a resumed
run rebuilds the same pairs. DMD measures the distance with LPIPS on images; here it is the squared error averaged
over elements, the scale of the matching loss (``losses.fdistill.fdistill_generator_loss``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ...samplers.sampling import sample
from ...samplers.schedules import karras_sigmas
from ...validation import require

PAIRS_SEED = 0        # the pairs' noise: a fixed seed, so every process and every resume gets the same pairs


@torch.no_grad()
def teacher_ode_pairs(teacher: Callable[..., Tensor], num: int, sample_shape: tuple[int, ...], noise_scale: float,
                      sigma_max: float, sigma_min: float, solver_steps: int, cond: Any = None,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``num`` pairs (z, y): z [num, *shape] standard normal, y [num, *shape] the teacher's ODE solution from
    x = noise_scale * z at sigma_max to sigma 0 (DPM-Solver++(2M), ``solver_steps`` steps on the EDM schedule down
    to sigma_min, then to 0). ``teacher(x, sigma, cond)`` is a denoiser; cond [num] or None."""
    z = torch.randn(num, *sample_shape, generator=torch.Generator().manual_seed(PAIRS_SEED)).to(device)
    sigmas = torch.cat([karras_sigmas(solver_steps, sigma_min, sigma_max), torch.zeros(1, dtype=torch.float64)])
    return z, sample(teacher, noise_scale * z, sigmas, "dpmpp_2m", cond).to(z.dtype)


def regression_loss(x: Tensor, target: Tensor) -> Tensor:
    """Per-sample squared error mean_elements (x - target)^2: [B, ...] -> [B] float32 (target detached)."""
    return (x.float() - target.detach().float()).pow(2).flatten(1).mean(1)


def regression_pairs(method) -> tuple[Tensor, Tensor, Any]:
    """The regression data of an ``FDistill`` method: ``config.regression_pairs`` pairs of its guided teacher from
    sigma_g, conditioned on the domain's default condition (classes in turn [N], or None)."""
    c, device = method.config, method.device()
    cond = method.domain.generation_condition(c.regression_pairs, None, device)
    require(cond is None or isinstance(cond, Tensor), "method.regression_weight / regression_warmup_steps need an "
            "unconditional or class-conditional pixel-space student, not a text-to-image one")
    z, y = teacher_ode_pairs(method.guided_teacher, c.regression_pairs, method.sample_shape, method.generator_noise_scale,
                             method.generator_sigma, c.sigma_min, c.regression_solver_steps, cond, device)
    return z, y, cond


def regression_term(method, num: int) -> Tensor:
    """DMD's regression loss of ``method``'s student on ``num`` pairs drawn from its ``regression_pairs()``."""
    z, y, cond = method.regression_pairs()
    index = torch.randint(len(z), (num,), device=z.device)
    return regression_loss(method.student_sample(z[index], None if cond is None else cond[index]), y[index]).mean()


def regression_phase_loss(method, item) -> tuple[Tensor, dict[str, float]]:
    """The 'regression' warm-up phase: the regression loss alone, on as many pairs as the micro-batch has samples."""
    regression = regression_term(method, item.z.shape[0])
    return regression, {"regression/regression": float(regression.detach())}
