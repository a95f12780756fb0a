"""DC-Solver: UniPC with dynamic compensation (Zhao et al. 2024, "DC-Solver: Improving Predictor-Corrector Diffusion
Sampler via Dynamic Compensation", ECCV 2024), in VE / EDM sigma units, data prediction.

Misalignment (paper Sec. 3.1). UniPC's corrector turns the predicted x~_i into the corrected x_i^c with the network
output at x~_i, and that same output x0(x~_i, t_i) then drives every later step, although x_i^c is where the
trajectory now is. Evaluating again at x_i^c would cost one more NFE per step.

Dynamic compensation (paper Sec. 3.2, Eq. 8-9). Instead, the output used from step i on is the Lagrange polynomial
through the last K + 1 outputs {(tau_{i-k}, x0_{i-k})}, k = 0..K (K = ``dc_order``, the paper's default 2),
evaluated at a shifted time between the last two nodes:

    x0_i^dc = sum_k x0_{i-k} prod_{j != k} (tau* - tau_{i-j}) / (tau_{i-k} - tau_{i-j}),
    tau* = rho_i tau_i + (1 - rho_i) tau_{i-1}.

rho_i = 1 gives tau* = tau_i, the node itself: the solver is then exactly UniPC. The time variable here is
lambda = -log sigma, the variable UniPC integrates in (the paper interpolates in its VP time t; any smooth
reparameterisation only changes which rho is optimal). The first K steps, with fewer than K + 1 outputs, are not
compensated (as in the paper's warm-up). The step into sigma = 0 returns the compensated x0.

Ratios (paper Sec. 3.3). rho_i is searched step by step on a few reference trajectories (x at every sigma of the
list from a fine ODE solve): with rho_0 .. rho_{i-1} fixed, rho_i minimises the mean squared distance of the
*corrected* x_{i+1} (or of the final x0) to the reference; here by golden-section search on a bracket (no autograd
through the denoiser). The cascade polynomial regression (CPR, paper Sec. 3.4) predicts the ratios for any step count
N from searches at a few: rho(i, N) = sum_k c_k(N) (i / N)^k, each c_k a polynomial in N / 50, fitted in cascade
(first the per-N polynomials in i / N, then their coefficients across N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .plumbing import integrate, sigma_list, x0_function
from .solvers import dpm_solver_3
from .unipc import B_FUNCTIONS, MAX_ORDER, History, _run_unipc, unipc_step_orders

DC_ORDER = 2                        # K: Lagrange nodes K + 1 (the paper's default); at most MAX_ORDER - 1
RATIO_BRACKET = (0.0, 2.0)          # search_ratios: rho is searched in this interval (and rho = 1 is always tried)
SEARCH_ITERATIONS = 20              # golden-section iterations: bracket width x 0.618^20 ~ 1e-4
CPR_NFE_SCALE = 50.0                # CPR: c_k is a polynomial in N / CPR_NFE_SCALE (the paper's normalisation)


def lagrange_weights(nodes: Sequence[float], point: float) -> list[float]:
    """Weights w_k with p(point) = sum_k w_k y_k for the polynomial p through (nodes[k], y_k) (float64)."""
    return [math.prod((point - nodes[j]) / (nodes[k] - nodes[j]) for j in range(len(nodes)) if j != k)
            for k in range(len(nodes))]


def compensate(history: History, ratio: float, dc_order: int = DC_ORDER) -> Tensor:
    """The compensated x0 of the newest entry of ``history`` (list of (sigma_j, x0_j [B, ...]), newest last):
    the Lagrange polynomial through the last ``dc_order`` + 1 entries (in lambda = -log sigma) at
    tau* = rho lambda_i + (1 - rho) lambda_{i-1} (module docstring). Needs len(history) > dc_order."""
    entries = history[-(dc_order + 1):]
    lambdas = [-math.log(sigma) for sigma, _ in entries]
    target = ratio * lambdas[-1] + (1 - ratio) * lambdas[-2]
    weights = lagrange_weights(lambdas, target)
    result = weights[0] * entries[0][1]
    for weight, (_, x0) in zip(weights[1:], entries[1:]):
        result = result + weight * x0
    return result


def _compensation(ratios: Sequence[float], dc_order: int) -> Callable[[int, History], Tensor]:
    """The ``_run_unipc`` hook: step i's x0 compensated with ratios[i] once K + 1 outputs exist."""
    def hook(i: int, history: History) -> Tensor:
        newest = history[-1][1]
        if len(history) <= dc_order or ratios[i] == 1.0:
            return newest
        return compensate(history, ratios[i], dc_order)
    return hook


def _check(variant: str, order: int, dc_order: int) -> None:
    if variant not in B_FUNCTIONS:
        raise ValueError(f"dc_solver: unknown variant {variant!r}; allowed: {', '.join(B_FUNCTIONS)}")
    if order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"dc_solver: order must be 1, 2 or 3, got {order}")
    if dc_order not in range(1, MAX_ORDER):
        raise ValueError(f"dc_solver: dc_order must be 1 or {MAX_ORDER - 1}, got {dc_order}")


def _solve(x0_fn, x: Tensor, sigma_values: list[float], orders: list[int], variant: str, ratios: Sequence[float],
           dc_order: int, final_corrector: bool = False, progress: bool = False) -> Tensor:
    """UniPC (every step corrected) with compensation ``ratios`` [one per network evaluation]."""
    return _run_unipc(x0_fn, x, sigma_values, orders, variant, "data", set(range(len(orders))), final_corrector,
                      progress, "dc_solver", _compensation(ratios, dc_order))


def dc_solver(denoiser, x: Tensor, sigmas, cond=None, *, ratios: Sequence[float] | None = None,
              cpr: "CascadeRegression | None" = None, variant: str = "bh2", order: int = 3,
              dc_order: int = DC_ORDER, lower_order_final: bool = True, progress: bool = False) -> Tensor:
    """DC-Solver: UniPC-p (data prediction, corrector on every step but the last) with dynamic compensation.

    Args:
        ratios: rho_i per step (len = number of steps; ``search_ratios``); entries of the first ``dc_order``
            steps are not used. None: from ``cpr`` when given, else all 1 (exactly ``unipc``).
        cpr: a ``CascadeRegression`` that predicts the ratios for this step count.
        variant, order, lower_order_final: as ``unipc`` (UniPC's B(h), predictor order, last-steps rule).
        dc_order: K, the Lagrange interpolation's degree (1 or 2).
    """
    _check(variant, order, dc_order)
    sigma_values = sigma_list(sigmas)
    num_steps = len(sigma_values) - 1
    if ratios is None:
        ratios = cpr.ratios(num_steps, dc_order) if cpr is not None else [1.0] * num_steps
    if len(ratios) != num_steps:
        raise ValueError(f"dc_solver: {len(ratios)} ratios for {num_steps} steps")
    orders = unipc_step_orders(sigma_values, order, lower_order_final)
    return _solve(x0_function(denoiser, cond), x, sigma_values, orders, variant, list(ratios), dc_order,
                  progress=progress)


# ------------------------------------------------------------------------------------------------ ratio search


@torch.no_grad()
def reference_trajectory(denoiser, noise: Tensor, sigmas, cond: Any = None, substeps: int = 40) -> list[Tensor]:
    """x at sigmas[1:] from ``noise`` at sigmas[0]: ``substeps`` log-spaced singlestep DPM-Solver-3 steps per interval
    (3 NFE each); at a final sigma = 0 the target is the denoiser's x0 at the last positive sigma (what every
    solver's final step returns). Each entry [B, ...]."""
    sigma_values = sigma_list(sigmas)
    x, states = noise, []
    for high, low in zip(sigma_values[:-1], sigma_values[1:]):
        if low == 0:
            states.append(x0_function(denoiser, cond)(x, high))
            break
        fine = torch.logspace(math.log10(high), math.log10(low), substeps + 1, dtype=torch.float64)
        x = integrate(dpm_solver_3, denoiser, x, fine, cond)
        states.append(x)
    return states


def _golden_section(loss: Callable[[float], float], low: float, high: float, iterations: int) -> tuple[float, float]:
    """(argmin, min) of a unimodal ``loss`` on [low, high] by golden-section search."""
    shrink = (math.sqrt(5) - 1) / 2
    a, b = low + (1 - shrink) * (high - low), low + shrink * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - shrink) * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + shrink * (high - low)
            fb = loss(b)
    return (a, fa) if fa <= fb else (b, fb)


@torch.no_grad()
def search_ratios(denoiser, noise: Tensor, sigmas, reference: list[Tensor], cond: Any = None, *,
                  variant: str = "bh2", order: int = 3, dc_order: int = DC_ORDER, lower_order_final: bool = True,
                  bracket: tuple[float, float] = RATIO_BRACKET, iterations: int = SEARCH_ITERATIONS) -> list[float]:
    """Compensation ratios for ``sigmas`` found step by step on reference trajectories (paper Sec. 3.3).

    Args:
        noise: [B, ...] starts at sigmas[0] (a few trajectories: the paper uses 10).
        reference: x at sigmas[1:] for those starts (``reference_trajectory``).
    Returns: one ratio per step; 1 for the first ``dc_order`` steps (not compensated). Cost: about
    ``iterations`` x (i + 2) network evaluations for step i.
    """
    _check(variant, order, dc_order)
    sigma_values = sigma_list(sigmas)
    num_steps = len(sigma_values) - 1
    orders = unipc_step_orders(sigma_values, order, lower_order_final)
    x0_fn = x0_function(denoiser, cond)
    ratios = [1.0] * num_steps
    for i in range(dc_order, num_steps):
        ends_at_zero = sigma_values[i + 1] == 0

        def loss(ratio: float) -> float:
            trial = ratios[:i] + [ratio] + ratios[i + 1:]
            # Stop at sigma_{i+1}, corrected there (the full run's next step): the final corrector does exactly that.
            out = _solve(x0_fn, noise, sigma_values[:i + 2], orders[:i + 1], variant, trial, dc_order,
                         final_corrector=not ends_at_zero)
            return (out - reference[i]).pow(2).mean().item()

        best, best_loss = _golden_section(loss, *bracket, iterations)
        ratios[i] = best if best_loss < loss(1.0) else 1.0
    return ratios


@dataclass
class CascadeRegression:
    """CPR (paper Sec. 3.4): rho(i, N) = sum_k c_k(N) (i / N)^k with c_k(N) = sum_m coefficients[k, m] (N / 50)^m.
    coefficients: [step_degree + 1, nfe_degree + 1] float64. Predictions are clipped to ``bracket`` (the search's
    interval): a quadratic extrapolated past the fitted step counts can leave it by orders of magnitude (fitted at
    NFE 5-15 on the benchmark's Gaussian, unclipped rho at NFE 20 made the error 3.6e3 instead of 4.5e-3)."""

    coefficients: np.ndarray
    bracket: tuple[float, float] = RATIO_BRACKET

    @classmethod
    def fit(cls, searched: dict[int, Sequence[float]], dc_order: int = DC_ORDER, step_degree: int = 2,
            nfe_degree: int = 2, bracket: tuple[float, float] = RATIO_BRACKET) -> "CascadeRegression":
        """Fit to searched ratios {N: ratios of an N-step run} (the first ``dc_order`` entries, fixed at 1, are
        left out). Stage 1: per N, least squares of rho_i on (i / N)^k; stage 2: per k, of c_k(N) on (N / 50)^m.
        Needs > step_degree fitted steps per N and > nfe_degree step counts."""
        if len(searched) <= nfe_degree:
            raise ValueError(f"CascadeRegression.fit: needs > {nfe_degree} step counts, got {len(searched)}")
        per_nfe = []
        for steps, ratios in sorted(searched.items()):
            index = np.arange(dc_order, steps)
            if len(index) <= step_degree:
                raise ValueError(f"CascadeRegression.fit: {steps} steps leave {len(index)} ratios to fit, "
                                 f"need > {step_degree}")
            design = np.vander(index / steps, step_degree + 1, increasing=True)
            per_nfe.append(np.linalg.lstsq(design, np.asarray(ratios, dtype=np.float64)[index], rcond=None)[0])
        nfe_design = np.vander(np.array(sorted(searched)) / CPR_NFE_SCALE, nfe_degree + 1, increasing=True)
        stage_two = np.linalg.lstsq(nfe_design, np.stack(per_nfe), rcond=None)[0]       # [m, k]
        return cls(stage_two.T.copy(), bracket)

    def ratios(self, num_steps: int, dc_order: int = DC_ORDER) -> list[float]:
        """Predicted ratios for ``num_steps`` steps (1 for the first ``dc_order``)."""
        powers_n = (num_steps / CPR_NFE_SCALE) ** np.arange(self.coefficients.shape[1])
        step_coefficients = self.coefficients @ powers_n                                  # c_k(N)
        low, high = self.bracket
        return [1.0 if i < dc_order else min(max(float(np.polyval(step_coefficients[::-1], i / num_steps)), low), high)
                for i in range(num_steps)]


DC_SOLVERS: dict[str, Callable[..., Tensor]] = {"dc_solver": dc_solver}
