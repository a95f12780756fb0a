"""UniPC: the unified predictor-corrector of Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", NeurIPS 2023), data- and noise-prediction forms, in VE / EDM sigma units.

Derivation (alpha = 1, lambda = -log sigma, a step from sigma_s to sigma_t, h = log(sigma_s / sigma_t) > 0). The exact
solution of the probability-flow ODE in data prediction (DPM-Solver++, Lu et al. 2022b, Sec. 3) is

    x_t = (sigma_t / sigma_s) x_s + integral_0^h e^{u - h} x0(lambda_s + u) du.

Expanding x0 in a Taylor series around lambda_s and integrating term by term (integral_0^h e^{u-h} u^n / n! du
= h^{n+1} phi_{n+1}(-h)) gives, with z = -h and the exponential-integrator functions phi_1(z) = (e^z - 1) / z,
phi_{k+1}(z) = (phi_k(z) - 1/k!) / z,

    x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) x0_s - sum_{n>=1} h^n z phi_{n+1}(z) x0^{(n)}(lambda_s).

A divided difference D_k = (x0_k - x0_s) / r_k expands to sum_n r_k^{n-1} h^n x0^{(n)} / n!, so B(h) sum_k w_k D_k
matches the sum up to n = m exactly when sum_k w_k r_k^{n-1} = z phi_{n+1}(z) n! / B(h) for n = 1 .. m.

UniPC (Sec. 3, written with -h for data prediction as in the paper's appendix on data prediction) does not
estimate the derivatives one by one; it replaces the whole sum by one scale B(h) times a combination of divided
differences on nodes r_k = (lambda_k - lambda_s) / h (r_k < 0 for past points, r = 1 for the new point at t):

    x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) x0_s - B(h) sum_k w_k D_k,      D_k = (x0_k - x0_s) / r_k,

with the weights solving the order conditions R w = g (Sec. 3), R[i, k] = r_k^i (i = 0 .. m-1) and
g_n = z phi_{n+1}(z) n! / B(h) (n = 1 .. m). B(h) is any function with B(h) = O(h): the paper's two choices are
B_1(h) = z ("bh1") and B_2(h) = e^z - 1 ("bh2").

- UniP-p (predictor) uses the p - 1 past points of the history (m = p - 1); it is of order p.
- UniC-p (corrector) adds the network evaluation at the predicted x_t as the node r = 1 (m = p) and recomputes
  x_t from the same x_s; it raises the order to p + 1. The evaluation at the *predicted* x_t is the one
  the next predictor uses, so the corrector costs no extra network evaluation (UniPC's key property).
- With a single node (m = 1) the weight is 1/2, the h -> 0 value of g_1, as in the authors' code and Diffusers'
  ``UniPCMultistepScheduler``: it keeps the order conditions (g_1 = 1/2 + O(h)) and makes UniP-2 with bh2 exactly
  DPM-Solver++(2M).
- With two or more nodes the weights solve R w = g exactly, so B(h) w does not depend on B: bh1 and bh2 differ only
  where a single node gets 1/2 (UniP-2, UniC-1), and UniP-3 integrates the quadratic through the last three x0's,
  i.e. it is the full-Taylor ``dpmpp_3m_taylor``.

Noise prediction (the paper's main-text form; Diffusers' ``predict_x0=False``) runs the same construction on
eps = (x - x0) / sigma with z = +h: x_t = x_s - sigma_t ((e^h - 1) eps_s + B(h) sum_k w_k D_k), B(h) = h or e^h - 1.
On smooth data with Karras sigmas (the benchmark's Gaussian and mild mixture) it is the more accurate form at 6-20
steps; on sharp data (the stiff mixture) it is far less accurate (benchmarks/README.md).

The final step is never corrected unless ``final_corrector`` (one extra network evaluation at the end point; with a
last sigma of 0, the final denoise is evaluated at the corrected previous point instead). ``lower_order_final`` uses
UniPC's rule: the order is at most the number of integration steps left (the authors' code and Diffusers), where a
final denoise to sigma = 0 counts as a step from 8 steps on and not below (``plumbing.integration_steps``).
Coefficients are computed in Python float64 once per step.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import numpy as np
from torch import Tensor

from .plumbing import History, X0Fn, integration_steps, progress_steps, sigma_list, step_orders, x0_function

B_FUNCTIONS: dict[str, Callable[[float], float]] = {"bh1": lambda z: z, "bh2": math.expm1}
PREDICTIONS = ("data", "noise")
MAX_ORDER = 3


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j + k)! (phi_0 = e^z); float64. The recurrence phi_{k+1} = (phi_k - 1/k!) / z
    cancels catastrophically for small |z|, so |z| < 1 uses the series (25 terms: error < 1e-25 relative)."""
    if abs(z) < 1:
        return sum(z ** j / math.factorial(j + k) for j in range(25))
    value = math.exp(z)
    for n in range(k):
        value = (value - 1 / math.factorial(n)) / z
    return value


def unipc_weights(z: float, nodes: Sequence[float], variant: str) -> tuple[float, list[float]]:
    """B and the weights w of the divided differences on ``nodes`` (the r_k); z = -h (data prediction) or h (noise).

    Solves R w = g (Zhao et al. 2023, Sec. 3) with R[i, k] = r_k^i and g_n = z phi_{n+1}(z) n! / B(z);
    a single node gets w = [1/2] (see the module docstring). Returns (B(z), w) as Python floats.
    """
    scale = B_FUNCTIONS[variant](z)
    if len(nodes) <= 1:
        return scale, [0.5] * len(nodes)
    powers = np.vander(np.asarray(nodes, dtype=np.float64), increasing=True).T      # R[i, k] = r_k^i
    g = [z * phi(n + 1, z) * math.factorial(n) / scale for n in range(1, len(nodes) + 1)]
    return scale, np.linalg.solve(powers, np.asarray(g)).tolist()


def unipc_update(x_s: Tensor, sigma_s: float, sigma_t: float, history: History, variant: str,
                 model_t: Tensor | None = None, prediction: str = "data") -> Tensor:
    """One UniP-p step (``model_t`` None) or its UniC-p correction (``model_t`` = the network's output at the
    predicted x_t), in data prediction (outputs x0) or noise prediction (outputs eps = (x - x0) / sigma).

    Args:
        x_s: [B, ...] the (corrected) sample at sigma_s.
        history: the last p (sigma_j, output_j), newest (sigma_s, output_s) last; p is the order.
        variant: "bh1" or "bh2" (the B(h) of the module docstring).
    Returns: [B, ...] x at sigma_t > 0.
    """
    *past, (_, model_s) = history
    h = math.log(sigma_s / sigma_t)
    nodes = [-math.log(sigma_j / sigma_s) / h for sigma_j, _ in reversed(past)]      # r_k = (lambda_k - lambda_s)/h
    differences = [(model_j - model_s) / r for (_, model_j), r in zip(reversed(past), nodes)]
    if model_t is not None:
        nodes.append(1.0)
        differences.append(model_t - model_s)
    z, x_weight, output_weight = (-h, sigma_t / sigma_s, 1.0) if prediction == "data" else (h, 1.0, sigma_t)
    scale, weights = unipc_weights(z, nodes, variant)
    update = math.expm1(z) * model_s
    for weight, difference in zip(weights, differences):
        update = update + (scale * weight) * difference
    return x_weight * x_s - output_weight * update


def unipc_step_orders(sigmas: list[float], max_order: int, lower_order_final: bool) -> list[int]:
    """Predictor order of each step (0 = denoise to sigma = 0): warm-up 1, 2, ..., and with ``lower_order_final``
    at most the number of integration steps left (UniPC's rule, applied at every step count; with fewer than
    ``DENOISE_NOT_COUNTED_BELOW`` steps the final denoise is not counted, see ``integration_steps``)."""
    orders = step_orders(sigmas, max_order, multistep=True, lower_order_final=False)
    if lower_order_final:
        steps = integration_steps(sigmas, multistep=True)
        orders = [min(order, steps - i) if i < steps else order for i, order in enumerate(orders)]
    return orders


Compensation = Callable[[int, History], Tensor]
"""DC-Solver's hook (dc_solver.py): (step i, history with step i's x0 last) -> the x0 that replaces it."""


def _run_unipc(x0_fn: X0Fn, x: Tensor, sigmas: list[float], orders: list[int], variant: str, prediction: str,
               corrected: set[int], final_corrector: bool, progress: bool, name: str,
               compensate: Compensation | None = None) -> Tensor:
    """The multistep loop: step i evaluates the network at its (predicted) start x_i, corrects x_i with it when step
    i - 1 is in ``corrected``, then predicts x_{i+1}. One network evaluation per step (+1 with ``final_corrector``).
    ``compensate`` (data prediction) replaces step i's x0 after the correction, for every later use of it."""
    def output(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:          # (x0, the model output UniPC uses)
        x0 = x0_fn(x, sigma)
        return x0, (x0 if prediction == "data" else (x - x0) / sigma)

    update = partial(unipc_update, variant=variant, prediction=prediction)
    history: History = []
    x_prev, prev_order = x, 0
    for i, order in progress_steps(orders, progress, name):
        sigma_s = sigmas[i]
        x0, model_s = output(x, sigma_s)
        if prev_order and i - 1 in corrected:
            x = update(x_prev, sigmas[i - 1], sigma_s, history[-prev_order:], model_t=model_s)
        history = history[-(MAX_ORDER - 1):] + [(sigma_s, model_s)]
        if compensate is not None:
            x0 = compensate(i, history)
            history[-1] = (sigma_s, x0)
        if order == 0:                         # into sigma = 0: denoise (the limit of every order-1 step)
            return x0_fn(x, sigma_s) if final_corrector else x0
        x_prev, prev_order = x, order
        x = update(x, sigma_s, sigmas[i + 1], history[-order:])
    if final_corrector:
        x = update(x_prev, sigmas[-2], sigmas[-1], history[-prev_order:], model_t=output(x, sigmas[-1])[1])
    return x


def unipc(denoiser, x: Tensor, sigmas, cond=None, *, variant: str = "bh2", order: int = 3,
          prediction: str = "data", lower_order_final: bool = True, corrector: bool = True,
          disable_corrector: Sequence[int] = (), final_corrector: bool = False, progress: bool = False) -> Tensor:
    """UniPC-p (Zhao et al. 2023): multistep UniP-p predictor + UniC-p corrector, 1 NFE per step.

    Args:
        variant: "bh1" (B(h) = -h) or "bh2" (B(h) = e^{-h} - 1; the paper's choice for guided sampling).
        order: p in 1..3 (predictor order; with the corrector the method is of order p + 1).
        prediction: "data" (x0, the paper's choice for few steps) or "noise" (eps; Diffusers' predict_x0=False).
        lower_order_final: order at most the number of steps left (see the module docstring).
        corrector: apply UniC (False: UniP-p alone, order p).
        disable_corrector: step indices whose result is not corrected (Diffusers' ``disable_corrector``).
        final_corrector: also correct the last step, at the cost of one extra network evaluation.
    """
    if variant not in B_FUNCTIONS:
        raise ValueError(f"unipc: unknown variant {variant!r}; allowed: {', '.join(B_FUNCTIONS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unipc: unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    if order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"unipc: order must be 1, 2 or 3, got {order}")
    sigma_values = sigma_list(sigmas)
    orders = unipc_step_orders(sigma_values, order, lower_order_final)
    corrected = set(range(len(orders)) if corrector else ()) - set(disable_corrector)
    return _run_unipc(x0_function(denoiser, cond), x, sigma_values, orders, variant, prediction, corrected,
                      final_corrector, progress, f"unipc_{variant}")


UNIPC_SOLVERS: dict[str, Callable[..., Tensor]] = {
    "unipc_bh1": partial(unipc, variant="bh1"),
    "unipc_bh2": partial(unipc, variant="bh2"),
    "unipc_bh1_noise": partial(unipc, variant="bh1", prediction="noise"),
    "unipc_bh2_noise": partial(unipc, variant="bh2", prediction="noise"),
}
