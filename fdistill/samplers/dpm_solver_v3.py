"""DPM-Solver-v3 (Zheng et al. 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics",
NeurIPS 2023), in VE / EDM sigma units (alpha = 1, lambda = -log sigma), with its empirical model statistics (EMS).

Parameterisation (paper Sec. 3.1, alpha = 1). With the noise prediction eps = (x - D) / sigma the ODE is
dx/dlambda = -sigma eps. For statistics l, s, b (functions of lambda, one value per element of a sample) write

    f(x, lambda) = sigma eps - l x = (1 - l) x - D,              dx/dlambda = -l x - f,

    g(lambda) = e^{-(S(lambda) - S_s)} f(lambda) - integral_{lambda_s}^{lambda} e^{-(S(r) - S_s)} b(r) dr,

with L, S the integrals of l, s along lambda (S_s = S(lambda_s)). If f' = s f + b held exactly, g would be constant.
The exact solution from lambda_s to lambda_t (paper Eq. 9) is

    x_t = e^{L_s - L_t} x_s - integral e^{L - L_t + S - S_s} g dlambda
          - integral e^{L - L_t} (integral_{lambda_s}^{lambda} e^{S - S(r)} b(r) dr) dlambda,

and a Taylor expansion of g around lambda_s gives the predictor of order n + 1 (paper Eq. 11)

    x_t = e^{L_s - L_t} (x_s - sum_{k=0}^{n} Phi_k g^{(k)}(lambda_s)) - bias,
    Phi_k = integral_{lambda_s}^{lambda_t} e^{(L + S)(lambda) - (L + S)(lambda_s)} (lambda - lambda_s)^k / k! dlambda.

The derivatives g^{(k)} come from the last n + 1 evaluations (multistep, paper Sec. 3.3): either by solving the
Taylor system on their lambda offsets (full order) or, for the "pseudo-order" variant, from Newton divided differences
(the k-th divided difference times k!), which needs no matrix solve and is more stable with few steps. The corrector
(paper Sec. 3.4) recomputes x_t from x_s after the network has been evaluated at the predicted x_t, adding that
evaluation as a node (order + 1); f at t is kept, so it costs no extra evaluation.

l = 1, s = b = 0 gives f = -D: with the full-order predictor (``predictor_pseudo=False``, the default from 15 steps
on) the solver is then exactly multistep DPM-Solver++ with the Taylor coefficients (order 3 after its warm-up:
``dpmpp_3m_taylor``; order 2: Diffusers' 2M with ``solver_type="heun"``); l = 0, s = -1, b = 0 gives f = sigma eps
and g = e^{lambda - lambda_s} f = sigma_s eps, i.e. multistep DPM-Solver (noise prediction).
Literal zero statistics (l = s = b = 0) expand sigma eps itself, which is neither; the neutral statistics that give
DPM-Solver++ are l = 1, s = b = 0 (``ModelStatistics.constant()``, the default without EMS; the authors' code calls
them "degenerated"). The statistics l, s, b (EMS) and their estimation from a denoiser are in ``ems.py``.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .ems import ModelStatistics, cumulative_trapezoid, interpolate
from .plumbing import progress_steps, sigma_list, step_orders, x0_function
from .v3_variants import V3_VARIANTS

MAX_ORDER = 3
THIRD_ORDER_FROM_STEPS = 10     # default_order: the predictor is second order for fewer steps
PSEUDO_PREDICTOR_BELOW = 15     # default_predictor_pseudo: pseudo-order predictor for fewer steps
QUADRATURE_INTERVALS = 128        # Simpson intervals per step for Phi_k and the b-term (even)
INTEGRAL_GRID_SPACING = 0.01      # lambda spacing of the tabulated L, S and b-integral
INTEGRAL_GRID_MARGIN = 2.0        # the table extends this far (in lambda) beyond the statistics grid
QUADRATURE_CHUNK_ELEMENTS = 2 ** 22   # at most this many (node, element) values per chunk of steps (memory bound)


class _Integrals:
    """L, S (integrals of l, s) and B = integral of e^{-S} b, tabulated on a fine lambda grid and interpolated
    linearly (exact for L and S when l and s are constant, as in the reductions to DPM-Solver(++))."""

    def __init__(self, stats: ModelStatistics):
        low = stats.lambdas[0].item() - INTEGRAL_GRID_MARGIN
        high = stats.lambdas[-1].item() + INTEGRAL_GRID_MARGIN
        self.grid = torch.linspace(low, high, int(math.ceil((high - low) / INTEGRAL_GRID_SPACING)) + 1,
                                   dtype=torch.float64)
        l, s, b = (interpolate(stats.lambdas, v, self.grid) for v in (stats.l, stats.s, stats.b))
        self.statistics_lambdas, self.l = stats.lambdas, stats.l     # l itself at a schedule's lambdas (``keep``)
        self.L = cumulative_trapezoid(self.grid, l)
        self.S = cumulative_trapezoid(self.grid, s)
        self.B = cumulative_trapezoid(self.grid, torch.exp(-self.S) * b)

    def at(self, lambdas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L, S, B) at lambdas [M]: each [M, *sample_shape]."""
        if bool((lambdas < self.grid[0]).any() or (lambdas > self.grid[-1]).any()):
            raise ValueError(f"dpm_solver_v3: sigma range exp(-lambda) for lambda in [{lambdas.min().item():.3f}, "
                             f"{lambdas.max().item():.3f}] exceeds the statistics' lambda range "
                             f"[{self.grid[0].item():.3f}, {self.grid[-1].item():.3f}]; "
                             "compute the EMS on a wider grid")
        return tuple(interpolate(self.grid, table, lambdas) for table in (self.L, self.S, self.B))


def _simpson_weights(lam_s: Tensor, lam_t: Tensor, intervals: int = QUADRATURE_INTERVALS) -> tuple[Tensor, Tensor]:
    """Nodes and composite Simpson weights on [lam_s, lam_t] for M steps at once: lam_s, lam_t [M]; both [M, n + 1]."""
    fraction = torch.linspace(0.0, 1.0, intervals + 1, dtype=torch.float64)
    nodes = lam_s[:, None] + (lam_t - lam_s)[:, None] * fraction
    weights = torch.ones(intervals + 1, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return nodes, weights * ((lam_t - lam_s) / (3 * intervals))[:, None]


def step_coefficients(integrals: _Integrals, lam_s: Tensor, lam_t: Tensor, max_k: int = MAX_ORDER
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """For M steps lam_s -> lam_t ([M] each), by Simpson quadrature of the tabulated integrals:
    e^{L_s - L_t} [M, *shape], e^{L_s - L_t} Phi_k for k = 0 .. max_k [M, max_k + 1, *shape] and the b-term
    integral_{lam_s}^{lam_t} e^{L - L_t} integral_{lam_s}^{lam} e^{S - S(r)} b(r) dr dlam [M, *shape] (module
    docstring); float64. They depend on the schedule and the statistics only, never on x, so ``dpm_solver_v3``
    computes them for all its steps before the first network evaluation."""
    nodes, weights = _simpson_weights(lam_s, lam_t)                   # [M, n + 1]
    L, S, B = (table.unflatten(0, nodes.shape) for table in integrals.at(nodes.flatten()))   # [M, n + 1, *shape]
    shape = (*nodes.shape, *[1] * (L.ndim - 2))
    L_t, S_s, B_s = L[:, -1:], S[:, :1], B[:, :1]
    decay = torch.exp(L[:, 0] - L[:, -1])
    kernel = torch.exp(L + S - L_t - S_s) * weights.view(shape)       # e^{L - L_t + S - S_s} * weight
    offsets = (nodes - lam_s[:, None]).view(shape)
    phis = torch.stack([(kernel * offsets ** k).sum(1) / math.factorial(k) for k in range(max_k + 1)], dim=1)
    b_term = (torch.exp(L - L_t + S) * (B - B_s) * weights.view(shape)).sum(1)
    return decay, phis, b_term


class _ScheduleCoefficients:
    """What ``dpm_solver_v3`` needs of the statistics along one schedule of lambdas [N] (increasing), computed once,
    vectorised over the steps (float64): per step i -> i + 1, ``decay[i]``, ``phis[i]`` and ``b_term[i]``
    (``step_coefficients``), the integrals S and B at the schedule's lambdas (for g), and 1 - l there (``keep``, in
    the sample's dtype and device). ``update_weights`` folds them into one weight per term of an update."""

    def __init__(self, integrals: _Integrals, lambdas: list[float], like: Tensor):
        grid = torch.tensor(lambdas, dtype=torch.float64)
        self.lambdas = grid
        _, self.S, self.B = integrals.at(grid)
        self.keep = (1 - interpolate(integrals.statistics_lambdas, integrals.l, grid)).to(like).unbind(0)
        self.dtype, self.device = like.dtype, like.device
        starts, ends = grid[:-1], grid[1:]
        chunk = max(1, QUADRATURE_CHUNK_ELEMENTS // (self.S[0].numel() * (QUADRATURE_INTERVALS + 1)))
        parts = [step_coefficients(integrals, starts[k:k + chunk], ends[k:k + chunk])
                 for k in range(0, max(1, len(starts)), chunk)]       # one empty chunk for a 1-step list
        self.decay, self.phis, self.b_term = (torch.cat(values) for values in zip(*parts))
        self._weights: dict[tuple[tuple[int, ...], bool], tuple[Tensor, Tensor, list[Tensor]]] = {}

    def update_weights(self, nodes: tuple[int, ...], pseudo: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The update from the expansion point s = nodes[0] to s + 1 with the evaluations f_j at the schedule
        indices ``nodes`` (paper Eq. 11) as one linear combination, x_t = decay x_s + constant + sum_j w_j f_j:
        with g_j = e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s) and g^{(k)} = sum_j W[k, j] g_j (``derivative_weights``),
        w_j = -e^{S_s - S_j} sum_k Phi_k W[k, j] and constant = -b_term + sum_j e^{S_s} (B_j - B_s) sum_k Phi_k W[k, j]
        (Phi_k scaled by e^{L_s - L_t}). Computed in float64 on first use, cached in the sample's dtype and device, so
        a step costs len(nodes) + 1 fused multiply-adds."""
        key = (nodes, pseudo)
        if key not in self._weights:
            s, at_nodes = nodes[0], list(nodes)
            mixing = torch.as_tensor(derivative_weights((self.lambdas[at_nodes] - self.lambdas[s]).tolist(), pseudo))
            combined = torch.tensordot(mixing.T, self.phis[s, :len(nodes)], dims=1)   # sum_k Phi_k W[k, j]: [j, *shape]
            scale = torch.exp(self.S[s] - self.S[at_nodes])
            shift = torch.exp(self.S[s]) * (self.B[at_nodes] - self.B[s])
            constant = (shift * combined).sum(0) - self.b_term[s]
            as_sample = dict(dtype=self.dtype, device=self.device)
            self._weights[key] = (self.decay[s].to(**as_sample), constant.to(**as_sample),
                                  list((-scale * combined).to(**as_sample)))
        return self._weights[key]


NEUTRAL_STATISTICS = ModelStatistics.constant()   # l = 1, s = b = 0: DPM-Solver++ (one object, so cached)
COEFFICIENT_CACHE_SIZE = 4           # statistics objects whose coefficients are kept (most recent first)
_coefficient_cache: dict[int, tuple[weakref.ref, _Integrals, dict]] = {}


def schedule_coefficients(stats: ModelStatistics, lambdas: list[float], like: Tensor) -> _ScheduleCoefficients:
    """``_ScheduleCoefficients`` of ``stats`` on ``lambdas``, reused across sample() calls with the same statistics
    object, schedule, dtype and device (statistics are treated as immutable). With per-element statistics of a
    large sample the tables and quadrature take seconds (4x64x64 elements, 20 steps: about 18 s on one CPU thread),
    far more than the steps themselves, so a sampler that draws many batches pays it once."""
    key = id(stats)
    entry = _coefficient_cache.pop(key, None)
    if entry is None or entry[0]() is not stats:
        entry = (weakref.ref(stats), _Integrals(stats), {})
    _coefficient_cache[key] = entry
    while len(_coefficient_cache) > COEFFICIENT_CACHE_SIZE:
        _coefficient_cache.pop(next(iter(_coefficient_cache)))
    _, integrals, by_schedule = entry
    schedule_key = (tuple(lambdas), like.dtype, like.device)
    if schedule_key not in by_schedule:
        by_schedule.clear()                 # one schedule per statistics object: a sampler reuses one list
        by_schedule[schedule_key] = _ScheduleCoefficients(integrals, lambdas, like)
    return by_schedule[schedule_key]


# ----------------------------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------------------------

Node = tuple[int, Tensor]              # (index j of lambda_j in the schedule, f_j [B, ...]) of one evaluation


def derivative_weights(offsets: list[float], pseudo: bool) -> np.ndarray:
    """W [n + 1, n + 1] with g^{(k)}(lambda_s) ~ sum_j W[k, j] g_j for g at offsets [0, d_1, ..., d_n] (d_j = lambda_j -
    lambda_s, the expansion point first; row 0 is g_0 itself). Full: solve sum_k g^{(k)} d_j^k / k! = g_j - g_0
    (paper Sec. 3.3). Pseudo-order: k! times the k-th Newton divided difference on the nodes in the given order."""
    n = len(offsets) - 1
    identity = np.eye(n + 1)
    if n == 0:
        return identity
    if pseudo:
        table, rows = list(identity), [identity[0]]
        for k in range(1, n + 1):
            table = [(table[j + 1] - table[j]) / (offsets[j + k] - offsets[j]) for j in range(len(table) - 1)]
            rows.append(math.factorial(k) * table[0])
        return np.stack(rows)
    system = np.array([[d ** k / math.factorial(k) for k in range(1, n + 1)] for d in offsets[1:]])
    inverse = np.linalg.inv(system)                      # g^{(k)} = sum_j inverse[k - 1, j] (g_{j+1} - g_0)
    return np.vstack([identity[0], np.hstack([-inverse.sum(1, keepdims=True), inverse])])


def dpm_solver_v3_update(coefficients: _ScheduleCoefficients, x_s: Tensor, nodes: list[Node], pseudo: bool) -> Tensor:
    """One DPM-Solver-v3 update from the expansion point nodes[0] = (s, f_s) (x_s at lambda_s) to lambda_{s+1}, of
    order len(nodes) (paper Eq. 11), as ``_ScheduleCoefficients.update_weights``' linear combination. The other nodes
    are earlier evaluations (predictor) or the evaluation at the predicted x_t followed by earlier ones (corrector)."""
    decay, constant, weights = coefficients.update_weights(tuple(j for j, _ in nodes), pseudo)
    x_t = torch.addcmul(constant, decay, x_s)
    for weight, (_, f) in zip(weights, nodes):
        x_t.addcmul_(weight, f)
    return x_t


def default_order(num_steps: int) -> int:
    """The predictor order ``dpm_solver_v3`` uses by default: 2 below ``THIRD_ORDER_FROM_STEPS`` steps, else 3.

    With the corrector, order 2 is a third-order method and order 3 a fourth-order one. In scripts/bench_samplers.py
    (with EMS; 3 teachers x 2 schedules; error of order 2 / order 3) order 2 is ahead at 6 and 8 NFE on the mixtures
    (0.47-0.97, e.g. the stiff mixture on log-SNR sigmas at NFE 6: 7.9e-3 against 1.7e-2) and level on the Gaussian
    (0.95-1.07); at 10 NFE the two are level (0.85-1.11) and at 15-20 NFE order 3 is ahead (1.06-1.42); at 4-5 NFE the
    warm-up and lower-order-final steps make them equal.
    """
    return 2 if num_steps < THIRD_ORDER_FROM_STEPS else MAX_ORDER


def default_predictor_pseudo(num_steps: int) -> bool:
    """Whether ``dpm_solver_v3``'s predictor uses pseudo-order by default: below ``PSEUDO_PREDICTOR_BELOW`` steps.

    The authors' code uses the pseudo-order predictor for few steps (their EDM script: 5 or fewer, at order 3): with
    large steps the full Taylor solve extrapolates g^{(k)} from far-apart nodes with large weights, the divided
    differences do not. With two nodes (order 2, the default below ``THIRD_ORDER_FROM_STEPS``) both are the same, so
    the rule matters from 10 steps on. In scripts/bench_samplers.py at NFE 10 (with EMS; error pseudo / full) it is
    0.78 on the learned digits teacher (Karras and log-SNR), 0.98-1.15 on the mixtures, 1.00 on the Gaussian; at
    NFE 15 it is 1.24-1.45 on the mixtures, hence full order from 15 steps on, where DPM-Solver's lower-order-final
    rule also stops (``plumbing.LOWER_ORDER_FINAL_BELOW``).
    """
    return num_steps < PSEUDO_PREDICTOR_BELOW


def default_options(num_steps: int) -> dict[str, int | bool]:
    """The options ``dpm_solver_v3`` uses for ``num_steps`` steps unless given or calibrated."""
    return dict(order=default_order(num_steps), predictor_pseudo=default_predictor_pseudo(num_steps),
                lower_order_final=True, final_corrector=True)


def dpm_solver_v3(denoiser, x: Tensor, sigmas, cond=None, *, ems: ModelStatistics | None = None,
                  order: int | None = None, predictor_pseudo: bool | None = None, corrector: bool = True,
                  corrector_pseudo: bool = False, lower_order_final: bool | None = None,
                  final_corrector: bool | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver-v3 multistep predictor(-corrector), 1 NFE per step (Zheng et al. 2023, Alg. 1 / Sec. 3.3-3.4).

    Args:
        ems: the model's empirical statistics (``compute_ems`` / ``ModelStatistics.load``); None = l = 1, s = b = 0,
            i.e. multistep DPM-Solver++ with Taylor coefficients (plus the corrector when ``corrector``). If they
            carry a calibrated variant for this sigma list (``ems.calibrated_variant``), its options replace the
            step-count defaults of the four options below that are None.
        order: the predictor's order (1-3), warmed up 1, 2, ... over the first steps (``step_orders``); None =
            calibrated, else ``default_order(steps)``.
        predictor_pseudo / corrector_pseudo: derivatives of g from divided differences (pseudo-order) instead of the
            Taylor solve. predictor_pseudo None = calibrated, else ``default_predictor_pseudo(steps)`` (pseudo below
            15 steps).
            The authors' code corrects with pseudo-order; here the corrector defaults to the full solve: the
            pseudo-order corrector's g'(lambda_s) is the chord slope to lambda_t, an O(h) error that leaves it
            second order (log-SNR steps on the exact Gaussian, 16 / 32 / 64 steps: max error 0.060 / 0.029 / 0.0085
            against 0.020 / 6.8e-4 / 1.2e-4 with the full corrector), and with EMS it is 2-5x less accurate at
            5-10 NFE on the benchmark's mixtures (e.g. mild mixture, Karras, NFE 6: median L2 0.27 against 0.059).
        corrector: correct each step (order + 1) with the evaluation at its predicted end point (no extra NFE).
        lower_order_final: DPM-Solver's rule for fewer than 15 steps (``step_orders``); None = calibrated, else True.
        final_corrector: correct the last point before a final step into sigma = 0 (whose evaluation the final
            denoise reuses); None = calibrated, else True.
    A step into sigma = 0 returns the denoiser's output there, made consistent with the corrected point:
    D = (1 - l) x - f (f kept from the evaluation, as the corrector assumes).
    """
    sigma_values = sigma_list(sigmas)
    stats = NEUTRAL_STATISTICS if ems is None else ems
    given = dict(order=order, predictor_pseudo=predictor_pseudo, lower_order_final=lower_order_final,
                 final_corrector=final_corrector)
    calibrated = V3_VARIANTS[stats.calibrated_variant(sigma_values) or "default"]
    options = {**default_options(len(sigma_values) - 1), **calibrated,
               **{name: value for name, value in given.items() if value is not None}}
    order, predictor_pseudo = options["order"], options["predictor_pseudo"]
    lower_order_final, final_corrector = options["lower_order_final"], options["final_corrector"]
    if order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"dpm_solver_v3: order must be 1, 2 or 3, got {order}")
    orders = step_orders(sigma_values, order, multistep=True, lower_order_final=lower_order_final)
    lambdas = [-math.log(sigma) for sigma in sigma_values if sigma > 0]
    coefficients = schedule_coefficients(stats, lambdas, x)
    x0_fn = x0_function(denoiser, cond)
    history: list[Node] = []                   # newest first
    previous: tuple[Tensor, int] | None = None  # (x_s, predictor order) of the last step, for the corrector
    for i, step_order in progress_steps(orders, progress, "dpm_solver_v3"):
        keep = coefficients.keep[i]            # 1 - l at lambda_i
        f = torch.mul(keep, x).sub_(x0_fn(x, sigma_values[i]))
        if corrector and previous is not None and (final_corrector or orders[i] != 0):
            x_s, previous_order = previous
            x = dpm_solver_v3_update(coefficients, x_s, [history[0], (i, f)] + history[1:previous_order],
                                     corrector_pseudo)
        history = [(i, f)] + history[:MAX_ORDER - 1]
        if step_order == 0:
            return torch.mul(keep, x).sub_(f)
        previous = (x, step_order)
        x = dpm_solver_v3_update(coefficients, x, history[:step_order], predictor_pseudo)
    return x


DPM_SOLVER_V3_SOLVERS: dict[str, Callable[..., Tensor]] = {"dpm_solver_v3": dpm_solver_v3}
