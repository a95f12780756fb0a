"""Benchmark text-to-image evaluation at scale: a tiny Stable Diffusion pipeline (built from config, random weights)
on a prompt file of ``--num`` prompts, through

- ``fdistill fid --gen PIPELINE --prompts FILE`` (images drawn and streamed batch by batch into the extractor), and
- ``fdistill sample --prompts FILE`` (images written batch by batch as PNGs with captions.jsonl),

each in its own process, so its peak resident memory (``getrusage`` of the child, max RSS) is its own. Prints a
markdown table and writes JSON (``--out``). The point is that peak RSS does not grow with ``--num``: run two sizes.

    OMP_NUM_THREADS=1 python scripts/bench_t2i_eval.py --num 10000        # the issue's size
    OMP_NUM_THREADS=1 python scripts/bench_t2i_eval.py --num 500 --num 2000   # a few minutes on a shared CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from itertools import product
from pathlib import Path
from tempfile import TemporaryDirectory


def write_prompts(path: Path, num: int) -> None:
    """``num`` distinct-ish prompts from the tiny tokenizer's vocabulary (colour x shape x noun, cycled)."""
    from fdistill.tiny_sd import TINY_WORDS

    colours, shapes = TINY_WORDS[5:9], TINY_WORDS[9:13]
    nouns = ("image", "photo", "background")
    combos = [f"a {c} {s} {n}" for c, s, n in product(colours, shapes, nouns)]
    path.write_text("\n".join(combos[i % len(combos)] for i in range(num)) + "\n")


def run_measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process running ``command`` (``os.wait4``: that child's own
    resource usage, not the maximum over every child so far)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024                             # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, action="append", help="prompts (images); repeat for several sizes "
                        "(default 10000)")
    parser.add_argument("--image-size", type=int, default=16, help="tiny pipeline's image side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="solver steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", default="digits", help="fdistill fid --features (digits: built-in, offline)")
    parser.add_argument("--only", choices=("fid", "sample"), default=None, help="run one of the two commands")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/t2i_eval.json"))
    args = parser.parse_args(argv)
    sizes = args.num or [10_000]

    import torch

    from fdistill.pipelines import save_components
    from fdistill.tiny_sd import tiny_sd_components

    rows = []
    with TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_components(tiny_sd_components("sd15", image_size=args.image_size), str(tmp / "sd"))
        common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--guidance", "3"]
        for num in sizes:
            prompts = tmp / f"prompts_{num}.txt"
            write_prompts(prompts, num)
            commands = {
                "fid --gen PIPELINE --prompts": ["fid", "--gen", str(tmp / "sd"), "--prompts", str(prompts), "--ref",
                                                 "digits", "--features", args.features, "--quiet", *common],
                "sample --prompts (PNGs)": ["sample", "--model", str(tmp / "sd"), "--prompts", str(prompts),
                                            "--no-progress", "--out", str(tmp / f"gen_{num}"), *common],
            }
            for name, command in commands.items():
                if args.only and command[0] != args.only:
                    continue
                seconds, peak_mib = run_measured([sys.executable, "-m", "fdistill.cli", *command])
                rows.append({"command": name, "images": num, "seconds": round(seconds, 2),
                             "images_per_s": round(num / seconds, 2), "peak_rss_mib": round(peak_mib, 1)})
                print(rows[-1], file=sys.stderr)

    print(f"\n| command | images | wall s | images/s | peak RSS (MiB) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['images']:,} | {row['seconds']} | {row['images_per_s']} | "
              f"{row['peak_rss_mib']} |")
    report = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "num": sizes},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
