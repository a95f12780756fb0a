"""The digits f-distill benchmark's recipe (``scripts/bench_fdistill_digits.py``): ``experiment=digits_fdistill_exact``
with the divergence changed and extra Hydra overrides."""
from __future__ import annotations

from fdistill.config import build_run, compose


def build_method(divergence: str, extra: list[str]):
    """(method, data, batch size) of the digits_fdistill_exact recipe with ``divergence`` and the overrides
    ``extra``."""
    spec = compose(["experiment=digits_fdistill_exact", f"method.divergence={divergence}", *extra])
    run = build_run(spec, with_loggers=False)
    return run.method, run.data, spec.train.batch_size


def recipe_steps(extra: list[str]) -> int:
    """train.steps of the digits_fdistill_exact recipe (with the command line's overrides)."""
    return compose(["experiment=digits_fdistill_exact", *extra]).train.steps
