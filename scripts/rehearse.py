"""Real-size rehearsal of the paper recipes (``fdistill.rehearsal``): every recipe's real networks from their
published configs with random weights, a few steps of the recipe's method through the package's trainer, seconds
per step and peak memory next to the analytic minimum. Prints a markdown table and writes ``<out>.json`` and
``<out>.md`` after every row.

    OMP_NUM_THREADS=2 python scripts/rehearse.py                       # CPU: rows whose estimate fits --max-gib
    python scripts/rehearse.py --device cuda --compile both            # GPU: every row that fits, compiled and not
    python scripts/rehearse.py --recipes cifar10_ddo,sd15_dpo_lora --steps 2

Rows (``fdistill.rehearsal.REHEARSALS``): cifar10 / imagenet64 f-distill and DDO, DDO with a DiT-XL/2 reference,
sd15 / sdxl f-distill, DPO LoRA and DPO full, sd3 f-distill, DPO LoRA and DPO full (SD3 medium, 2.0 B), flux
f-distill (FLUX.1-dev, 11.9 B). A row whose estimated analytic minimum exceeds --max-gib (8 GiB on CPU, the GPU's
memory on GPU) is listed as skipped with its estimate: the SD3 and Flux rows never build on CPU. --bare names the
DPO row that also times a bare PyTorch loop (trainer/bare).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fdistill.rehearsal import REHEARSALS, RehearsalResult, estimate_gib, format_table, rehearse_in_subprocess

COMPILE_SETTINGS = {"off": (False,), "on": (True,), "both": (False, True)}


def machine(device: str) -> str:
    """One line naming the machine the numbers come from."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]   # native bf16 matmuls (autocast speed)
    cpu += f" ({', '.join(bf16)})" if bf16 else " (no native bf16)"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    line = (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")
    if device.startswith("cuda"):
        line = f"{torch.cuda.get_device_name(device)}; host: {line}"
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="all", help=f"comma-separated rows or 'all': {', '.join(REHEARSALS)}")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index>")
    parser.add_argument("--steps", type=int, default=3, help="trainer steps per row (>= 2: the first is warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="samples (DPO: pairs) per step, one process")
    parser.add_argument("--resolution", type=int, default=64, help="pixels of SD rows (latents: resolution / 8)")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="skip rows whose estimated analytic minimum exceeds this (default: 8 on CPU, the "
                             "GPU's memory on GPU)")
    parser.add_argument("--frozen-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the frozen SD parts (default: bfloat16 on CPU, where the recipes' float16 "
                             "fails under bf16 autocast; the recipe's on GPU)")
    parser.add_argument("--bare", default="sd15_dpo_lora", help="DPO row that also times the bare loop ('' = none)")
    parser.add_argument("--compile", default="off", choices=sorted(COMPILE_SETTINGS), help="train.compile setting(s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default: benchmarks/rehearsal_<device>)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing <out>.json (a row run again replaces its old one)")
    args = parser.parse_args(argv)
    names = list(REHEARSALS) if args.recipes == "all" else [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in REHEARSALS]
    if unknown or args.steps < 2:
        parser.error(f"unknown rows {unknown}; allowed: {sorted(REHEARSALS)}" if unknown else "--steps must be >= 2")
    args.names = names
    on_cpu = args.device == "cpu"
    args.max_gib = args.max_gib if args.max_gib is not None else (8.0 if on_cpu else device_gib(args.device))
    args.frozen_dtype = args.frozen_dtype or ("bfloat16" if on_cpu else None)
    args.out = Path(args.out or f"benchmarks/rehearsal_{args.device.split(':')[0]}")
    return args


def device_gib(device: str) -> float:
    """Total memory of the CUDA ``device`` in GiB: a row whose analytic minimum (a lower bound) exceeds it cannot
    run there, so it is listed as skipped instead of failing out of memory."""
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 30


def run_row(name: str, compile_networks: bool, args: argparse.Namespace) -> RehearsalResult:
    row = REHEARSALS[name]
    try:
        estimate = estimate_gib(row, args.resolution, args.frozen_dtype)
    except Exception as error:  # noqa: BLE001 - a row that cannot even compose is a row of the table, not a crash
        return RehearsalResult(name, row.experiment, row.architecture, args.device, compile=compile_networks,
                               status=f"failed: {' '.join(str(error).split())[:300]}")
    if estimate > args.max_gib:
        return RehearsalResult(name, row.experiment, row.architecture, args.device, compile=compile_networks,
                               analytic_gib=estimate, status=f"skipped: estimated minimum {estimate:.1f} GiB > "
                                                             f"{args.max_gib:g} GiB")
    return rehearse_in_subprocess(row, timeout=args.timeout, steps=args.steps, batch=args.batch, device=args.device,
                                  resolution=args.resolution, compile_networks=compile_networks,
                                  bare=name == args.bare, frozen_dtype=args.frozen_dtype or False)


def previous_rows(args: argparse.Namespace) -> list[RehearsalResult]:
    path = args.out.with_suffix(".json")
    if not (args.append and path.is_file()):
        return []
    return [RehearsalResult(**row) for row in json.loads(path.read_text())["rows"]]


def merged(old: list[RehearsalResult], new: list[RehearsalResult]) -> list[RehearsalResult]:
    """``old`` rows (table order kept) with those run again replaced, then the new ones."""
    fresh = {(r.name, r.compile): r for r in new}
    kept = [fresh.pop((r.name, r.compile), r) for r in old]
    return kept + list(fresh.values())


def write(results: list[RehearsalResult], args: argparse.Namespace, header: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": header, "rows": [asdict(r) for r in results]},
                                                        indent=1))
    args.out.with_suffix(".md").write_text(f"# Real-size rehearsal ({args.device})\n\nMeasured on: {header}.\n"
                                           f"Command: `python {' '.join(sys.argv)}`\n\n{format_table(results)}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = f"{machine(args.device)}; {time.strftime('%Y-%m-%d', time.gmtime())}"
    print(header, flush=True)
    old, results = previous_rows(args), []
    for compile_networks in COMPILE_SETTINGS[args.compile]:
        for name in args.names:
            results.append(run_row(name, compile_networks, args))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
            write(merged(old, results), args, header)
    print(format_table(merged(old, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
