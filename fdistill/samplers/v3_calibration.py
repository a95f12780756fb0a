"""Calibrating DPM-Solver-v3 for a model: which of its variants (``v3_variants.V3_VARIANTS``) to use on each sigma
list, measured on a few calibration samples against a fine ODE solve, and stored with the model's EMS.

Why. The few-step choices of the solver (lowering the order of the last steps, correcting the last point, the order
and pseudo-order of the predictor) trade stability against accuracy, and which side wins depends on the model: on
the benchmark's learned digits teacher keeping the predictor's order to the end is 1.15-1.29x more accurate at 4-6
steps, on a stiff Gaussian mixture it is up to 14x less accurate (``v3_variants``, benchmarks/README.md). The
authors' code sets such choices per model and step count by hand (their EDM script even switches statistics files
at 10 steps); DC-Solver (Zhao et al. 2024, Sec. 3.3) fits its compensation ratios per model on a few reference
trajectories. Here the choice is a small discrete set, so a hundred calibration samples decide it (a continuous
per-step search, DC-Solver's compensation on v3, overfitted 16 starts).

Rule. For each sigma list, every variant samples the same calibration noise; the error of a sample is the L2
distance to the fine solve (``fine_solution``); a variant replaces ``default`` only if its median error is at least
``MIN_GAIN`` lower, so noise in the calibration set does not move a model off the defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor
from tqdm.auto import tqdm

from .dc_solver import reference_trajectory
from .dpm_solver_v3 import default_options, dpm_solver_v3
from .ems import ModelStatistics
from .plumbing import integrate, sigma_list
from .v3_variants import V3_VARIANTS

MIN_GAIN = 0.1         # a variant must lower the calibration median error by this fraction to replace the default
REFERENCE_STEPS = 500  # fine_solution: log-spaced singlestep DPM-Solver-3 steps (1500 NFE) over the whole range


def solution_endpoints(sigmas: list[float]) -> tuple[float, ...]:
    """The part of a sigma list its answer depends on: (sigma_max, sigma_min) and the final 0 if it has one."""
    return (sigmas[0], sigmas[-2], 0.0) if sigmas[-1] == 0 else (sigmas[0], sigmas[-1])


def fine_solution(denoiser: Callable, start: Tensor, endpoints: tuple[float, ...], cond: Any = None) -> Tensor:
    """What every solver on a list with these ``solution_endpoints`` aims at from ``start`` [N, ...]: x at sigma_min,
    or D(x(sigma_min), sigma_min) when the list ends at 0, by one solve of ``REFERENCE_STEPS`` steps; lists of the same
    range (any step count or schedule) share it."""
    return reference_trajectory(denoiser, start, endpoints, cond, substeps=REFERENCE_STEPS)[-1]


def variant_errors(denoiser: Callable, stats: ModelStatistics, noise: Tensor, sigmas, cond: Any = None,
                   target: Tensor | None = None) -> dict[str, float]:
    """Median over the calibration samples of the L2 error of each ``V3_VARIANTS`` entry on the sigma list.

    Args:
        denoiser: ``D(x, sigma [B], cond) -> x0``.
        stats: the model's EMS (its own calibration is ignored: every variant runs with all its options given).
        noise: [N, *sample_shape] standard normal calibration noise (scaled by sigmas[0] here).
        sigmas: the decreasing sigma list (last usually 0).
        target: ``fine_solution`` of these starts and the list's endpoints; None = computed here.
    Returns: variant name -> median L2 error (in x units).
    """
    values = sigma_list(sigmas)
    start = values[0] * noise
    if target is None:
        target = fine_solution(denoiser, start, solution_endpoints(values), cond)
    errors = {}
    for name, options in V3_VARIANTS.items():
        given = {**default_options(len(values) - 1), **options}
        out = integrate(dpm_solver_v3, denoiser, start, values, cond, ems=stats, **given)
        errors[name] = (out - target).flatten(1).norm(dim=1).median().item()
    return errors


def choose_variant(errors: dict[str, float], min_gain: float = MIN_GAIN) -> str:
    """``default`` unless the most accurate variant's error is below (1 - min_gain) x the default's."""
    best = min(errors, key=errors.get)
    return best if errors[best] < (1 - min_gain) * errors["default"] else "default"


def calibrate_dpm_solver_v3(denoiser: Callable, stats: ModelStatistics, noise: Tensor, sigma_lists: list,
                            cond: Any = None, min_gain: float = MIN_GAIN, progress: bool = False
                            ) -> tuple[ModelStatistics, dict[tuple[float, ...], dict[str, float]]]:
    """``stats`` with a calibrated variant for each sigma list (added to, or replacing, its existing calibration),
    and the errors behind each choice (``variant_errors``), keyed by the sigma list as a tuple; ``progress``: a
    progress bar over the lists."""
    calibration, report, targets = dict(stats.calibration), {}, {}
    for sigmas in tqdm(sigma_lists, desc="calibrating dpm_solver_v3", disable=not progress, leave=False):
        key = tuple(sigma_list(sigmas))
        endpoints = solution_endpoints(key)
        if endpoints not in targets:
            targets[endpoints] = fine_solution(denoiser, key[0] * noise, endpoints, cond)
        report[key] = variant_errors(denoiser, stats, noise, key, cond, targets[endpoints])
        calibration[key] = choose_variant(report[key], min_gain)
    return dataclasses.replace(stats, calibration=calibration), report
