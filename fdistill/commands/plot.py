"""``fdistill plot RUN_DIR``: the training curves of a run (loss, evaluation metrics, learning rate, ...) as a PNG.

    fdistill plot runs/train                     # writes runs/train/curves.png
    fdistill plot runs/train --out loss.png

Reads ``RUN_DIR/metrics.jsonl`` (``fdistill.training.plots``); ``fdistill train`` writes the same PNG at the end
of every run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdistill.training.plots import CURVES_FILENAME, write_curves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdistill plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help=f"the PNG to write (default RUN_DIR/{CURVES_FILENAME})")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"fdistill plot: {metrics}: no such file (is {args.run_dir} a run directory?)", file=sys.stderr)
        return 2
    path = write_curves(metrics, args.out or args.run_dir / CURVES_FILENAME)
    if path is None:
        print(f"fdistill plot: {metrics} holds no scalars yet", file=sys.stderr)
        return 1
    print(path)
    return 0
