"""Entry point ``sample`` (solver chosen by name from the ``SOLVERS`` registry) and network-evaluation counting."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .dc_solver import DC_SOLVERS
from .dpm_solver_v3 import DPM_SOLVER_V3_SOLVERS
from .plumbing import integrate
from .solvers import SOLVERS as _BASE_SOLVERS
from .unipc import UNIPC_SOLVERS

SOLVERS: dict[str, Callable[..., Tensor]] = {**_BASE_SOLVERS, **UNIPC_SOLVERS, **DPM_SOLVER_V3_SOLVERS, **DC_SOLVERS}
"""Every solver by name: the DPM-Solver family (``solvers.py``), UniPC (``unipc.py``), DPM-Solver-v3
(``dpm_solver_v3.py``) and DC-Solver (``dc_solver.py``)."""


class CountingDenoiser(nn.Module):
    """A denoiser that forwards to ``denoiser`` and counts its calls (``.calls``): measures NFE of any sampler."""

    def __init__(self, denoiser: Callable):
        super().__init__()
        self.denoiser = denoiser
        self.calls = 0

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def _solver(name: str) -> Callable[..., Tensor]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    return SOLVERS[name]


@torch.no_grad()
def sample(denoiser: Callable, noise: Tensor, sigmas: Tensor, solver: str = "dpmpp_2m", cond: Any = None,
           **options) -> Tensor:
    """Integrate the probability-flow ODE (or the SDE of ``dpmpp_2m_sde``) from sigmas[0] to sigmas[-1].

    Args:
        denoiser: ``D(x, sigma, cond) -> x0`` (fdistill.denoisers protocol; a guidance wrapper is fine).
        noise: [B, ...] the sample at sigmas[0], already scaled (e.g. ``sigmas[0] * torch.randn(...)``).
        sigmas: strictly decreasing 1-D tensor (see ``fdistill.samplers.sigmas``); sigmas[-1] may be 0.
        solver: a key of ``SOLVERS``: euler, heun, dpm_solver_1/2/3, dpmpp_2s, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde,
            dpmpp_3m_taylor, unipc_bh1, unipc_bh2, unipc_bh1_noise, unipc_bh2_noise, dpm_solver_v3, dc_solver.
        cond: passed unchanged to every denoiser call.
        **options: solver options (``progress``; ``lower_order_final`` for the DPM-Solver family; ``r1``/``r2``;
            ``eta`` and ``generator`` for dpmpp_2m_sde; ``order``, ``prediction``, ``corrector``,
            ``disable_corrector`` and ``final_corrector`` for UniPC; ``ems`` (a ``ModelStatistics``, with its
            calibrated variants), ``order``, ``corrector``, ``predictor_pseudo``, ``corrector_pseudo``,
            ``final_corrector`` for dpm_solver_v3; ``ratios`` or ``cpr``, ``variant``, ``order``, ``dc_order`` for
            dc_solver).
    Returns:
        [B, ...] the sample at sigmas[-1], in noise's dtype. The computation runs in float64 when noise is float64
        and in float32 otherwise (also for fp16 noise or an fp16 model). No gradients are recorded.
    """
    return integrate(_solver(solver), denoiser, noise, sigmas, cond, **options)


def nfe(solver: str, num_steps: int, *, to_zero: bool = True, **options) -> int:
    """Network evaluations ``solver`` makes over ``num_steps`` steps (ending at sigma = 0 when ``to_zero``).

    Counted, not tabulated: the solver runs once on a [1, 1] input with a zero denoiser, so the count can never
    disagree with what ``sample`` does (e.g. Heun's single evaluation on a step into sigma = 0).
    """
    counter = CountingDenoiser(lambda x, sigma, cond: torch.zeros_like(x))
    sigma_values = torch.logspace(1, -1, num_steps + 1, dtype=torch.float64)
    if to_zero:
        sigma_values[-1] = 0.0
    sample(counter, torch.zeros(1, 1, dtype=torch.float64), sigma_values, solver, **options)
    return counter.calls


def generator_inputs(generator: Callable, z: Tensor, sigmas: tuple[float, ...] | list[float], noise_scale: float,
                     steps: Tensor | None = None, renoise: Tensor | None = None, cond: Any = None
                     ) -> tuple[Tensor, Tensor]:
    """Input of step ``steps[b]`` (0-based) of a few-step generator's chain (DMD2, Yin et al. 2024, Sec. 4.5):

        x_1 = c z at sigma_1,      x_{k+1} = G(x_k, sigma_k) + sigma_{k+1} eps_k   at sigma_{k+1}

    Args:
        generator: ``G(x, sigma [B], cond) -> x0`` (denoiser protocol).
        z: [B, *shape] standard normal.
        sigmas: the chain's decreasing noise levels sigma_1 > ... > sigma_K (one step: K = 1).
        noise_scale: c (sigma_1 for a VE input; sqrt(1 + sigma_1^2) for VP "pure noise").
        steps: [B] long in [0, K); None = 0 (the first input for every sample).
        renoise: [K - 1, B, *shape] standard normal eps_k (needed when some step > 0).
    Returns: x [B, *shape] and sigma [B] (float32 on z's device). Runs the generator max(steps) times, as is (wrap
    the call in ``torch.no_grad()`` where no gradient should flow, e.g. DMD2's backward simulation).
    """
    x = noise_scale * z
    sigma = torch.full((z.shape[0],), float(sigmas[0]), device=z.device)
    last = 0 if steps is None else int(steps.max())
    for k in range(1, last + 1):
        advance = steps >= k
        renoised = generator(x, sigma, cond) + float(sigmas[k]) * renoise[k - 1]
        x = torch.where(advance.view(-1, *[1] * (x.ndim - 1)), renoised.to(x.dtype), x)
        sigma = torch.where(advance, torch.full_like(sigma, float(sigmas[k])), sigma)
    return x, sigma


def generator_sample(generator: Callable, z: Tensor, sigmas: tuple[float, ...] | list[float], noise_scale: float,
                     renoise: Tensor | None = None, cond: Any = None) -> Tensor:
    """A one- or few-step generator's sample: the output of the last step of its chain (``generator_inputs``).
    z [B, *shape]; renoise [K - 1, B, *shape] (None for one step). Returns [B, *shape]."""
    steps = torch.full((z.shape[0],), len(sigmas) - 1, dtype=torch.long, device=z.device)
    x, sigma = generator_inputs(generator, z, sigmas, noise_scale, steps, renoise, cond)
    return generator(x, sigma, cond)
