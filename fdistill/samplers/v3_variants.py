"""The variants of DPM-Solver-v3 that a model's statistics file can name (``ModelStatistics.calibration``) and
``v3_calibration.calibrate_dpm_solver_v3`` chooses between; a module of its own so that the statistics (``ems``) and
the solver (``dpm_solver_v3``) can both import it."""
from __future__ import annotations

V3_VARIANTS: dict[str, dict[str, int | bool]] = {
    "default": {},
    "no_lower_order_final": {"lower_order_final": False},
    "no_final_corrector": {"final_corrector": False},
    "authors_few_step": {"order": 3, "predictor_pseudo": True, "lower_order_final": False},
}
"""The variants ``calibrate_dpm_solver_v3`` chooses between for a model and sigma list: options over the step-count
defaults (``default_options``). ``authors_few_step`` is the authors' EDM setting for 5 steps (order 3, pseudo-order
predictor, no lower-order-final). No step-count rule is best for every model: in scripts/bench_samplers.py (its
calibration errors) keeping the predictor's order on the last steps (``no_lower_order_final``) is 1.15-1.29x more
accurate at NFE 4-6 on the learned digits teacher and up to 14x less accurate on the stiff mixture (4 Karras steps)."""
