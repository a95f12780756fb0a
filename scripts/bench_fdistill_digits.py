"""Benchmark: one-step f-distill generators on the 8x8 digits vs the teacher with DPM-Solver++(2M), 20 steps.

Recipe: ``conf/experiment/digits_fdistill_exact.yaml`` (exact class-conditional teacher = the ideal denoiser of the digits,
one-step UNet student), with the divergence changed. Reports digits FD, class-histogram TV and within-class spread
(mean per-pixel std over samples of one class; the data's is 0.33, a generator that ignores its noise has 0) of
2,000 class-balanced samples for rkl (DMD2), kl and js and for the teacher; and the cost of the density-ratio
weighting: network
evaluations per student / critic step (counted with forward hooks) and training steps/s of js vs rkl (measured in
alternating blocks so that load changes of a shared machine hit both alike).

    python scripts/bench_fdistill_digits.py           # the recipe's steps per divergence
    python scripts/bench_fdistill_digits.py --quick   # 400 steps per divergence
Writes benchmarks/fdistill_digits.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fdistill.benchmarks.fdistill_2d import run_steps
from fdistill.benchmarks.fdistill_digits import build_method, recipe_steps
from fdistill.commands.distill import balanced_digit_metrics, teacher_samples
from fdistill.methods.base import StepContext

NUM_EVAL = 2000


def count_evaluations(method, data, batch_size: int) -> dict[str, dict[str, int]]:
    """Forward calls of each network in one student step and one critic step (one micro-batch)."""
    modules = {"student": method.networks["student"], "fake_score": method.networks["fake_score"],
               "teacher": method.frozen["teacher"], "discriminator": method.networks["discriminator"].head}
    counts = {name: 0 for name in modules}
    hooks = [module.register_forward_hook(lambda *_, key=name: counts.__setitem__(key, counts[key] + 1))
             for name, module in modules.items()]
    batch = next(data.loader(batch_size))
    result = {}
    for phase in ("student", "critic"):
        counts.update({name: 0 for name in counts})
        ctx = StepContext(step=0)
        for item in method.prepare_step(phase, [batch], ctx):
            method.loss(phase, item, ctx)[0].backward()
        method.zero_grad(set_to_none=True)
        result[phase] = dict(counts)
    for hook in hooks:
        hook.remove()
    return result


def interleaved_step_rates(extra: list[str], steps: int, rounds: int = 3) -> dict[str, float]:
    """Training steps/s of rkl and js measured in alternating blocks, so a change in machine load hits both alike."""
    methods = {name: build_method(name, extra) for name in ("rkl", "js")}
    seconds = {name: 0.0 for name in methods}
    for _ in range(rounds):
        for name, (method, data, batch_size) in methods.items():
            seconds[name] += run_steps(method, data, steps, batch_size)
    return {name: rounds * steps / total for name, total in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 steps per divergence")
    parser.add_argument("--steps", type=int, default=None, help="steps per divergence (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/fdistill_digits.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. method.lr=1e-3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for divergence in ("rkl", "kl", "js"):
        torch.manual_seed(0)
        method, data, batch_size = build_method(divergence, args.overrides)
        steps = args.steps or (400 if args.quick else recipe_steps(args.overrides))
        seconds = run_steps(method, data, steps, batch_size)
        metrics = balanced_digit_metrics(method.eval().generate(NUM_EVAL, torch.Generator().manual_seed(1)))
        results[divergence] = {**metrics, "nfe": 1, "train_seconds": seconds, "steps_per_sec": steps / seconds,
                               "evaluations_per_step": count_evaluations(method.train(), data, batch_size)}
        print(f"{divergence}: {results[divergence]}", flush=True)
    teacher = balanced_digit_metrics(teacher_samples(method, NUM_EVAL, torch.Generator().manual_seed(2)))
    results["teacher"] = {**teacher, "nfe": 20, "solver": "dpmpp_2m"}
    print("\n| model | NFE | digits FD | class TV | within-class std (data 0.33) | train steps/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = f"{r['steps_per_sec']:.2f}" if "steps_per_sec" in r else "-"
        print(f"| {name} | {r['nfe']} | {r['digits_fd']:.2f} | {r['class_tv']:.3f} | {r['within_class_std']:.3f} | {rate} |")
    goals = {"one_step_within_20pct_of_teacher_fd": {name: results[name]["digits_fd"] <= 1.2 * teacher["digits_fd"]
                                                     for name in ("rkl", "kl", "js")},
             "js_fd_below_rkl": results["js"]["digits_fd"] < results["rkl"]["digits_fd"]}
    print(f"\ngoals: {goals}")
    rates = interleaved_step_rates(args.overrides, steps=60 if args.quick else 150)
    overhead = rates["rkl"] / rates["js"] - 1
    print(f"\ninterleaved steps/s: rkl {rates['rkl']:.2f}, js {rates['js']:.2f}; "
          f"weighting overhead (js vs rkl wall time per step): {100 * overhead:+.1f} %")
    print("| divergence | student step: student / teacher / fake / disc-head | critic step: same |")
    print("|---|---|---|")
    for name in ("rkl", "js"):
        e = results[name]["evaluations_per_step"]
        row = lambda c: f"{c['student']} / {c['teacher']} / {c['fake_score']} / {c['discriminator']}"  # noqa: E731
        print(f"| {name} | {row(e['student'])} | {row(e['critic'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    out.write_text(json.dumps({"benchmark": "fdistill_digits", "steps": steps, "quick": args.quick,
                               "overrides": args.overrides, "samples": NUM_EVAL, "machine": machine,
                               "goals": goals, "interleaved_steps_per_sec": rates, "weighting_overhead": overhead,
                               "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
