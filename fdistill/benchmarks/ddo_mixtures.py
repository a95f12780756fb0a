"""DDO on a family of random Gaussian mixtures (``scripts/bench_ddo_mixtures.py``): the generator, the metrics and one
benchmark run (under-trained base, then the ``gmm_ddo`` recipe's self-play rounds).

The mixtures are drawn from a seed (``ddo_random_mixture``): 3-8 modes, weights spanning 30-60x with the lightest
>= 1 %, random positions in a box (modes at least ``min_separation`` apart, so 4-std balls never overlap) and random
widths. Every model is measured on the distribution itself: 20-step DPM-Solver++(2M) samples against fresh exact
samples of the mixture (sliced Wasserstein-1), the nearest-mode histogram against the weights (TV) and the share of
samples within 4 std of a mode (precision).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fdistill.config import compose, instantiate_optional
from fdistill.data import gaussian_mixture
from fdistill.evaluation.distribution import mode_precision, mode_total_variation, sliced_wasserstein_1
from fdistill.methods import ddo, denoising
from fdistill.methods.base import StepContext, run_step_callbacks
from fdistill.samplers.config import SamplerConfig
from fdistill.training.config import TrainConfig
from fdistill.training.trainer import Trainer

EVAL_SAMPLER = SamplerConfig(solver="dpmpp_2m", steps=20)      # the measurement: 20-step samples
PRECISION_RADIUS_STDS = 4.0
MAX_TRIES = 10_000


def _loguniform(rng: np.random.Generator, low: float, high: float, size=None):
    return np.exp(rng.uniform(math.log(low), math.log(high), size))


def ddo_random_mixture(seed: int, dim: int = 2, num_modes: tuple[int, int] = (3, 8),
                       weight_span: tuple[float, float] = (30.0, 60.0), min_weight: float = 0.01,
                       std_range: tuple[float, float] = (0.05, 0.15), box: float = 2.0,
                       min_separation: float = 1.2) -> dict[str, Tensor]:
    """A random Gaussian mixture from ``seed``: {'means' [K, dim], 'stds' [K], 'weights' [K]} (float64, weights sum
    to 1).

    K is uniform in ``num_modes`` (inclusive); the heaviest weight is R times the lightest with R uniform in
    ``weight_span``, the other weights are log-uniform in between (redrawn until the lightest share is >=
    ``min_weight``); means are uniform in [-box, box]^dim, redrawn until all pairs are >= ``min_separation`` apart;
    stds are log-uniform in ``std_range``. The weights are assigned to modes in random order.
    """
    rng = np.random.default_rng(seed)
    k = int(rng.integers(num_modes[0], num_modes[1] + 1))
    span = rng.uniform(*weight_span)
    for _ in range(MAX_TRIES):
        raw = np.concatenate([[1.0, span], _loguniform(rng, 1.0, span, k - 2)])
        if 1.0 / raw.sum() >= min_weight:
            break
    else:
        raise ValueError(f"no weights with span {span:.1f} over {k} modes keep the lightest >= {min_weight}")
    means: list[np.ndarray] = []
    for _ in range(MAX_TRIES):
        candidate = rng.uniform(-box, box, dim)
        if all(np.linalg.norm(candidate - m) >= min_separation for m in means):
            means.append(candidate)
            if len(means) == k:
                break
    else:
        raise ValueError(f"could not place {k} modes {min_separation} apart in [-{box}, {box}]^{dim}")
    weights = rng.permutation(raw) / raw.sum()
    stds = _loguniform(rng, *std_range, k)
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)   # noqa: E731
    return {"means": as_tensor(means), "stds": as_tensor(stds), "weights": as_tensor(weights)}



def distribution_metrics(denoiser, mixture: dict[str, Tensor], num: int, seed: int = 1234) -> dict[str, float]:
    """SW1 to fresh exact mixture samples, mode TV and precision of ``num`` 20-step samples of ``denoiser``."""
    data_points = gaussian_mixture(**mixture, num_samples=num, seed=seed + 1).dataset.tensors["x"]
    samples = ddo.sample_with(denoiser, num, (mixture["means"].shape[1],), EVAL_SAMPLER,
                              generator=torch.Generator().manual_seed(seed), batch=4096).double()
    return {"sw1": sliced_wasserstein_1(samples, data_points),
            "mode_tv": mode_total_variation(samples, mixture["means"], mixture["weights"]),
            "precision": mode_precision(samples, mixture["means"], mixture["stds"], PRECISION_RADIUS_STDS)}


def _fit(method, data, steps: int, batch: int, run_dir: Path, start_step: int = 0, seed: int = 0) -> None:
    """The one trainer (CPU, no EMA, no export) from global step ``start_step`` to ``steps``."""
    trainer = Trainer(method, data, TrainConfig(steps=steps, batch_size=batch, run_dir=str(run_dir), export=False,
                                                progress=False, checkpoint_every=steps, log_every=10_000, seed=seed,
                                                device="cpu", resume="never", ema_decays=[]))
    trainer.step = start_step
    trainer.fit()


def recipe_overrides(setting: dict[str, Any]) -> list[str]:
    """The ``gmm_ddo`` experiment with the benchmark's round count and length (everything else as shipped)."""
    return ["experiment=gmm_ddo", "model=mlp", "~model.path_or_hub_id", f"method.rounds={setting['rounds']}",
            f"method.steps_per_round={setting['steps_per_round']}",
            f"train.steps={setting['rounds'] * setting['steps_per_round']}", *setting.get("ddo_overrides", [])]


def run_mixture(mixture_seed: int, setting: dict[str, Any], train_seed: int = 0) -> dict[str, Any]:
    """Base (``base_steps`` of the documented denoising base command) then the DDO rounds on mixture
    ``mixture_seed``; rows: base and each round's selected snapshot (the next reference / the final model)."""
    torch.set_num_threads(1)
    mixture = ddo_random_mixture(mixture_seed, dim=setting.get("dim", 2))
    data = gaussian_mixture(**mixture, num_samples=20_000, seed=mixture_seed)
    base_spec = compose(["method=denoising", "model=mlp", f"train.steps={setting['base_steps']}",
                         "train.batch_size=256", f"train.seed={train_seed}"])
    ddo_spec = compose(recipe_overrides(setting))
    torch.manual_seed(train_seed)
    network = instantiate_optional(base_spec.cfg.model, dim=mixture["means"].shape[1])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _fit(denoising.build(base_spec.method_config, network, data), data, setting["base_steps"],
             base_spec.train.batch_size, Path(tmp) / "base", seed=train_seed)
        rows = [{"round": "base", **distribution_metrics(network.eval(), mixture, setting["samples"]),
                 "seconds": time.perf_counter() - started}]
        method = ddo.build(ddo_spec.method_config, network, data)
        length = ddo_spec.method_config.steps_per_round
        for r in range(ddo_spec.method_config.rounds):
            started = time.perf_counter()
            _fit(method, data, (r + 1) * length, ddo_spec.train.batch_size, Path(tmp) / "ddo", start_step=r * length,
                 seed=train_seed)
            last = r == ddo_spec.method_config.rounds - 1
            if last:
                method.finish()
            else:      # close the round as the next step would: end-of-round evaluation and reference swap
                run_step_callbacks(method, method.phase_at((r + 1) * length), StepContext(step=(r + 1) * length))
            chosen = method.networks["model"] if last else method.frozen["reference"]
            rows.append({"round": r + 1, **distribution_metrics(chosen, mixture, setting["samples"]),
                         "seconds": time.perf_counter() - started})
        selection = method.round_summary()
    return {"mixture_seed": mixture_seed, "train_seed": train_seed, "num_modes": len(mixture["weights"]),
            "weights": mixture["weights"].tolist(), "rows": rows, "selection": selection}


def improved(result: dict[str, Any], metric: str) -> bool:
    """The final model's ``metric`` is lower than the base's."""
    return result["rows"][-1][metric] < result["rows"][0][metric]
