"""DDO on a family of random Gaussian mixtures (``scripts/bench_ddo_mixtures.py``): the generator, the metrics and one
benchmark run (under-trained base, then the ``gmm_ddo`` recipe's self-play rounds).

The mixtures are the f-distill benchmark's family (``fdistill.benchmarks.mixtures.random_mixture``): 3-8 modes,
weights spanning 30-60x with the lightest >= 1 %, random positions in a box (4-std balls never overlap) and random
widths. Every model is measured on the distribution itself: 20-step DPM-Solver++(2M) samples against fresh exact
samples of the mixture (sliced Wasserstein-1), the nearest-mode histogram against the weights (TV) and the share of
samples within 4 std of a mode (precision).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fdistill.config import compose, instantiate_optional
from fdistill.data import gaussian_mixture
from fdistill.benchmarks.mixtures import mode_metrics, random_mixture
from fdistill.evaluation.distribution import sliced_wasserstein_1
from fdistill.methods import ddo, denoising
from fdistill.methods.base import StepContext, run_step_callbacks
from fdistill.samplers.config import SamplerConfig
from fdistill.training.config import TrainConfig
from fdistill.training.trainer import Trainer

EVAL_SAMPLER = SamplerConfig(solver="dpmpp_2m", steps=20)      # the measurement: 20-step samples


def distribution_metrics(denoiser, mixture: dict[str, Tensor], num: int, seed: int = 1234) -> dict[str, float]:
    """SW1 to fresh exact mixture samples, mode TV and precision of ``num`` 20-step samples of ``denoiser``."""
    data_points = gaussian_mixture(**mixture, num_samples=num, seed=seed + 1).dataset.tensors["x"]
    samples = ddo.sample_with(denoiser, num, (mixture["means"].shape[1],), EVAL_SAMPLER,
                              generator=torch.Generator().manual_seed(seed), batch=4096).double()
    modes = mode_metrics(samples, mixture["means"], mixture["stds"], mixture["weights"])
    return {"sw1": sliced_wasserstein_1(samples, data_points), "mode_tv": modes["tv"], "precision": modes["precision"]}


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
    mixture = random_mixture(mixture_seed, dim=setting.get("dim", 2))
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
