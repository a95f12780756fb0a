"""f-distill on Gaussian mixtures with exact teachers: one training run with mode metrics and, optionally, the
discriminator's log density ratio probed against the oracle's during training (``scripts/bench_fdistill_mixtures.py``,
``scripts/diagnose_fdistill_ratio.py``)."""
from __future__ import annotations

from typing import Any

import torch

from fdistill.benchmarks.fdistill_2d import COLD_START, recipe, run_steps
from fdistill.benchmarks.mixtures import mode_metrics
from fdistill.benchmarks.oracle import ExactStudentDenoiser, OracleRatioFDistill, oracle_log_ratio
from fdistill.data import gaussian_mixture
from fdistill.losses.fdistill import density_ratio
from fdistill.methods.fdistill import build

PROBE_SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# The five-mode mixture: weights 70 % .. 2 % (heaviest first), std 0.1, modes 1.6-3.2 apart.
FIVE_MODES: dict[str, Any] = {
    "means": [[0.0, 0.0], [2.0, 1.0], [-2.0, 1.0], [1.5, -2.0], [-1.5, -2.0]],
    "stds": [0.1] * 5,
    "weights": [0.70, 0.14, 0.10, 0.04, 0.02],
}


# The mixture recipe until the full-size family benchmark: the student at every second step (one critic update per
# student update). The diagnostics and the cold-start rows ran with it, so their scripts pin it.
EVERY_SECOND_STEP = {"student_update_freq": 2}
COLD_RECIPE = COLD_START | EVERY_SECOND_STEP     # the mixture recipe before its warm start (cold-start rows, diagnostics)


@torch.no_grad()
def ratio_probe(method, teacher, num: int = 512, num_reference: int = 4096, seed: int = 0) -> list[dict[str, float]]:
    """The discriminator's log r against the oracle's on ``num`` noised student samples per noise level of
    PROBE_SIGMAS (independent ``num_reference`` student samples make the oracle's density estimate).

    Per sigma: corr (Pearson), rmse and bias (mean disc - oracle) of log r, and weight_error: mean |h_disc - h_oracle|
    of the kl weights after the method's clamps and normalisation to mean 1 (what the student loss uses).
    """
    generator = torch.Generator().manual_seed(seed)
    x, reference = method.generate(num, generator), method.generate(num_reference, generator)
    c, rows = method.config, []
    for sigma_value in PROBE_SIGMAS:
        sigma = torch.full((num,), sigma_value)
        x_t = x + sigma_value * torch.randn(x.shape, generator=generator)
        disc = method.discriminator_logit(x_t, sigma).double()
        exact = oracle_log_ratio(teacher, x_t, sigma, reference)
        weights = [density_ratio(logit, c.logit_clamp, c.ratio_min, c.ratio_max).double() for logit in (disc, exact)]
        weights = [w / w.mean() for w in weights]
        rows.append({"sigma": sigma_value, "corr": float(torch.corrcoef(torch.stack([disc, exact]))[0, 1]),
                     "rmse": float((disc - exact).pow(2).mean().sqrt()), "bias": float((disc - exact).mean()),
                     "oracle_std": float(exact.std()), "weight_error": float((weights[0] - weights[1]).abs().mean())})
    return rows


def train_on_mixture(mixture: dict, divergence: str, seed: int, steps: int, overrides: dict | None = None,
                     oracle: bool = False, exact_fake_score: bool = False, probe_every: int = 0, batch_size: int = 256, num_eval: int = 4000) -> dict:
    """Train one student on ``mixture`` (random_mixture's dict) and return its mode metrics (``mixtures.mode_metrics``)
    and seconds; with ``oracle`` the student's weights use the exact ratio (``OracleRatioFDistill``); with
    ``exact_fake_score`` the fake score is the exact denoiser of fresh student samples (``ExactStudentDenoiser``); with
    ``probe_every`` > 0 also ``probes``: [{"step", "sigmas": ratio_probe rows}] every ``probe_every`` steps."""
    torch.manual_seed(seed)
    data = gaussian_mixture(**mixture, num_samples=20000, seed=seed)
    teacher = data.extras["denoiser"]
    method = build(recipe(divergence, data.sample_shape[0], **(overrides or {})), None, data)
    if oracle:
        method = OracleRatioFDistill(method.config, teacher, method.networks["student"], method.networks["fake_score"],
                                     method.domain)
    if exact_fake_score:
        method.networks["fake_score"] = ExactStudentDenoiser(method.networks["fake_score"], method.generate)
    probes: list[dict] = []

    def probe(step: int) -> None:
        if probe_every and step % probe_every == 0 and method.uses_discriminator:
            probes.append({"step": step, "sigmas": ratio_probe(method, teacher, seed=seed)})

    seconds = run_steps(method, data, steps, batch_size, seed, after_step=probe)
    samples = method.generate(num_eval, torch.Generator().manual_seed(1000 + seed))
    metrics = mode_metrics(samples, teacher.means, teacher.stds[:, 0], teacher.weights)
    return metrics | {"seconds": round(seconds, 1)} | ({"probes": probes} if probe_every else {})
