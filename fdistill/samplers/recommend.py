"""The default solver for a step count: the most accurate one-evaluation-per-step solver at that NFE in
``scripts/bench_samplers.py`` (geometric mean of the error over a Gaussian, two Gaussian mixtures and the learned
digits teacher, Karras and log-SNR sigmas; the tables are in benchmarks/samplers.md). ``dpm_solver_v3`` is left out:
``fdistill sample`` runs it only with the model's statistics (``--ems``, which selects it), and with them it is the
most accurate solver (with its defaults or calibrated, ``scripts/compute_ems.py --calibrate``) in 47 of the
benchmark's 56 settings. ``dc_solver`` needs ratios searched for the model (``search_ratios``), so it is never a
default."""
from __future__ import annotations

RECOMMENDED_SOLVERS: dict[int, str] = {4: "unipc_bh1", 5: "unipc_bh2", 6: "dpmpp_2m", 8: "dpmpp_2m", 10: "unipc_bh2",
                                       15: "unipc_bh2", 20: "unipc_bh2"}
"""Benchmarked step count (= NFE) -> best solver."""


def recommended_solver(num_steps: int) -> str:
    """The solver of the largest benchmarked step count <= ``num_steps`` (the smallest one below 4 steps)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    fitting = [steps for steps in RECOMMENDED_SOLVERS if steps <= num_steps]
    return RECOMMENDED_SOLVERS[max(fitting) if fitting else min(RECOMMENDED_SOLVERS)]
