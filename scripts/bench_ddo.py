"""Benchmark DDO self-play rounds on CPU: built-in digits and a 2-D Gaussian mixture, plus the cost per step.

For each dataset: train a deliberately under-trained base with the plain denoising loss (the same trainer), then run
DDO for a few rounds (``fdistill.methods.ddo``; the round's best snapshot becomes the next reference). Every row is
measured on the same number of DPM-Solver++(2M) samples with the same seeds:

- digits: digits FD (built-in feature network, ``fdistill.evaluation.digits_fd``) and the total-variation distance of
  the predicted-class histogram of class-balanced conditional samples to the uniform class distribution;
- Gaussian mixture (ring of 8 modes, weights 1..8): TV distance of the nearest-mode histogram to the true mode
  weights, precision (fraction of samples within 3 std of a mode) and raw Frechet distance.

    python scripts/bench_ddo.py --quick      # ~10 min on 2 CPU cores
    python scripts/bench_ddo.py              # longer rounds

Prints markdown tables and writes benchmarks/ddo.json (or --out).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from fdistill.data import digits, gaussian_mixture
from fdistill.evaluation.digits import digits_class_histogram, digits_fd
from fdistill.methods import denoising
from fdistill.methods.base import StepContext, run_step_callbacks
from fdistill.methods.ddo import DDO, DDOConfig, build as build_ddo, class_balanced_labels, sample_with
from fdistill.networks import MLPDenoiser, tiny_unet
from fdistill.training.config import SamplerConfig, TrainConfig
from fdistill.training.trainer import Trainer

SETTINGS = {
    "quick": {"digits": {"base_steps": 150, "rounds": 3, "steps_per_round": 50, "batch": 64, "eval_every": 25,
                         "eval_samples": 500, "samples": 1000},
              "gmm": {"base_steps": 300, "rounds": 3, "steps_per_round": 100, "batch": 256, "eval_every": 25,
                      "eval_samples": 2000, "samples": 5000}},
    "full": {"digits": {"base_steps": 300, "rounds": 3, "steps_per_round": 150, "batch": 128, "eval_every": 50,
                        "eval_samples": 1000, "samples": 2000},
             "gmm": {"base_steps": 500, "rounds": 3, "steps_per_round": 300, "batch": 512, "eval_every": 50,
                     "eval_samples": 4000, "samples": 10000}},
}
SAMPLER = SamplerConfig(solver="dpmpp_2m", steps=20)
DDO_HYPER = {"digits": {"lr": 1e-4, "alpha": 1.0, "beta": 0.05},
             "gmm": {"lr": 1e-4, "alpha": 1.0, "beta": 0.1}}


def train(method, data, steps: int, batch: int, run_dir: Path, start_step: int = 0) -> None:
    """Run the one trainer (CPU, no EMA, no export) from global step ``start_step`` to ``steps``."""
    trainer = Trainer(method, data, TrainConfig(steps=steps, batch_size=batch, run_dir=str(run_dir), export=False,
                                                progress=False, checkpoint_every=steps, log_every=10_000,
                                                device="cpu", resume="never"))
    trainer.step = start_step
    trainer.fit()


def train_base(network, data, steps: int, batch: int, run_dir: Path, label_dropout: float):
    config = denoising.DenoisingConfig(lr=2e-3, label_dropout=label_dropout, sampler=SAMPLER)
    train(denoising.build(config, network, data), data, steps, batch, run_dir)
    return network.eval()


# ------------------------------------------------------------------------------------------------- metrics
def digits_metrics(denoiser, num: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(1234)
    labels = class_balanced_labels(num, 10, generator)
    images = sample_with(denoiser, num, (1, 8, 8), SAMPLER, labels, generator)
    histogram = digits_class_histogram(images)
    return {"digits_fd": digits_fd(images), "class_tv": 0.5 * (histogram - 0.1).abs().sum().item()}


def gmm_metrics(denoiser, data, num: int) -> dict[str, float]:
    mixture = data.extras["denoiser"]
    points = sample_with(denoiser, num, data.sample_shape, SAMPLER, None, torch.Generator().manual_seed(1234)).double()
    distances = torch.cdist(points, mixture.means)                                   # [N, K]
    nearest = distances.argmin(1)
    histogram = torch.bincount(nearest, minlength=len(mixture.means)).double() / num
    within = distances.gather(1, nearest[:, None])[:, 0] < 3 * mixture.stds[nearest, 0]
    reference = data.dataset.tensors["x"].double()
    from fdistill.evaluation.frechet import FeatureStats, fid_from_stats
    return {"mode_tv": 0.5 * (histogram - mixture.weights).abs().sum().item(), "precision": within.double().mean().item(),
            "raw_fd": fid_from_stats(FeatureStats().update(points), FeatureStats().update(reference))}


# ------------------------------------------------------------------------------------------------- DDO rounds
def run_rounds(method: DDO, data, setting: dict, run_dir: Path, metrics) -> list[dict]:
    """DDO round by round with the real trainer (one trainer run per round, continuing the global step count); after
    each round the metrics of the model that becomes the next reference (the round's best snapshot)."""
    rows = [{"round": "base", **metrics(method.frozen["reference"]), "seconds": 0.0}]
    for r in range(setting["rounds"]):
        started = time.perf_counter()
        train(method, data, (r + 1) * setting["steps_per_round"], setting["batch"], run_dir,
              start_step=r * setting["steps_per_round"])
        if r == setting["rounds"] - 1:
            method.finish()
        else:   # close the round as the next step would: end-of-round evaluation and reference swap
            next_step = (r + 1) * setting["steps_per_round"]
            run_step_callbacks(method, method.phase_at(next_step), StepContext(step=next_step))
        chosen = method.networks["model"] if r == setting["rounds"] - 1 else method.frozen["reference"]
        rows.append({"round": r + 1, **metrics(chosen), "seconds": time.perf_counter() - started})
    return rows


def ddo_config(name: str, setting: dict, evaluator: str, **extra) -> DDOConfig:
    return DDOConfig(**DDO_HYPER[name], rounds=setting["rounds"], steps_per_round=setting["steps_per_round"],
                     eval_every=setting["eval_every"], evaluator=evaluator, eval_samples=setting["eval_samples"],
                     fake_pool_size=max(1024, setting["batch"] * 8), generation_batch=1024, sampler=SAMPLER,
                     **extra)


def bench_digits(setting: dict, work: Path) -> list[dict]:
    data = digits()
    torch.manual_seed(0)
    base = train_base(tiny_unet(num_classes=10), data, setting["base_steps"], setting["batch"], work / "base", 0.1)
    method = build_ddo(ddo_config("digits", setting, "digits_fd", label_dropout=0.1), base, data)
    return run_rounds(method, data, setting, work / "ddo", lambda d: digits_metrics(d, setting["samples"]))


def bench_gmm(setting: dict, work: Path) -> list[dict]:
    data = gaussian_mixture(preset="ring8")
    torch.manual_seed(0)
    base = train_base(MLPDenoiser(dim=2, hidden=64, depth=2), data, setting["base_steps"], setting["batch"],
                      work / "base", 0.0)
    method = build_ddo(ddo_config("gmm", setting, "raw_frechet"), base, data)
    return run_rounds(method, data, setting, work / "ddo", lambda d: gmm_metrics(d, data, setting["samples"]))


# ------------------------------------------------------------------------------------------------- cost per step
def time_loss(method, phase: str, items: list, reps: int) -> float:
    """Mean seconds of loss + backward over ``reps`` repetitions (after one warm-up)."""
    for index in range(reps + 1):
        if index == 1:
            started = time.perf_counter()
        loss, _ = method.loss(phase, items[0], StepContext(step=0))
        loss.backward()
    return (time.perf_counter() - started) / reps


def bench_cost(batch: int, reps: int = 5) -> dict[str, float]:
    data = digits()
    network = tiny_unet(num_classes=10)
    batch_dict = {"x": torch.stack([data.dataset[i]["x"] for i in range(batch)]),
                  "label": torch.arange(batch) % 10}
    plain = denoising.build(denoising.DenoisingConfig(), copy.deepcopy(network), data)   # DDO freezes `network`
    ddo = DDO(DDOConfig(fake_pool_size=batch, sampler=SamplerConfig(steps=2)), network, data.sample_shape, 10)
    ddo_items = ddo.prepare_step("round_0", [batch_dict], StepContext(step=0))
    seconds_plain = time_loss(plain, "model", [batch_dict], reps)
    seconds_ddo = time_loss(ddo, "round_0", ddo_items, reps)
    return {"batch": batch, "denoising_ms": 1e3 * seconds_plain, "ddo_ms": 1e3 * seconds_ddo,
            "ratio": seconds_ddo / seconds_plain}


# ------------------------------------------------------------------------------------------------- report
def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| round | " + " | ".join(columns) + " | seconds |", "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['round']} | " + " | ".join(f"{row[c]:.4g}" for c in columns) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~10-minute CPU setting")
    parser.add_argument("--only", choices=["digits", "gmm", "cost"], default=None, help="run one part")
    parser.add_argument("--out", default="benchmarks/ddo.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on an oversubscribed CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    setting = SETTINGS[mode]
    result = {"mode": mode, "settings": setting, "ddo": DDO_HYPER, "sampler": "dpmpp_2m, 20 steps, karras",
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"}
    with TemporaryDirectory() as tmp:
        if args.only in (None, "cost"):
            result["cost"] = bench_cost(setting["digits"]["batch"])
            print(f"cost per step (batch {result['cost']['batch']}, tiny UNet): denoising "
                  f"{result['cost']['denoising_ms']:.1f} ms, DDO {result['cost']['ddo_ms']:.1f} ms "
                  f"({result['cost']['ratio']:.2f}x)\n")
        if args.only in (None, "digits"):
            result["digits"] = bench_digits(setting["digits"], Path(tmp) / "digits")
            print("digits (tiny class-conditional UNet)\n" + table(result["digits"], ["digits_fd", "class_tv"]) + "\n")
        if args.only in (None, "gmm"):
            result["gmm"] = bench_gmm(setting["gmm"], Path(tmp) / "gmm")
            print("Gaussian mixture ring8 (MLP)\n" + table(result["gmm"], ["mode_tv", "precision", "raw_fd"]) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
