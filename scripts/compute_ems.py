"""Compute DPM-Solver-v3's empirical model statistics (EMS) for a model and save them (safetensors).

    python scripts/compute_ems.py --model path/to/model --shape 3 32 32 --out ems.safetensors
    python scripts/compute_ems.py --teacher mixture_mild --out ems.safetensors   # an analytic teacher of the bench

The lambda grid is uniform in lambda = -log sigma over [-log sigma_max, -log sigma_min] (``--grid`` points); the
model's data samples come from the model itself (dpmpp_3m, ``--sampling-steps``). Use the file with
``sample(..., solver="dpm_solver_v3", ems=ModelStatistics.load(path))``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from fdistill.samplers import compute_ems

BENCH_SIGMA_RANGE = (0.029167, 14.614641)     # scripts/bench_samplers.py: Stable Diffusion's sigma range


def bench_teacher(name: str):
    """(denoiser, sample shape) of a teacher of scripts/bench_samplers.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_samplers_teachers import TEACHERS
    if name not in TEACHERS:
        raise ValueError(f"unknown --teacher {name!r}; allowed: {', '.join(TEACHERS)}")
    build, dim, _ = TEACHERS[name]
    return build()[0], (dim,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model directory or hub id (fdistill.denoisers.load_denoiser)")
    source.add_argument("--teacher", help="an analytic teacher of scripts/bench_samplers.py")
    parser.add_argument("--shape", type=int, nargs="+", help="shape of one sample (required with --model)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--grid", type=int, default=121, help="number of lambda grid points")
    parser.add_argument("--sigma-min", type=float, default=None)
    parser.add_argument("--sigma-max", type=float, default=None)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.teacher is not None:
            denoiser, shape = bench_teacher(args.teacher)
            default_range, dtype = BENCH_SIGMA_RANGE, torch.float64
        else:
            if not args.shape:
                raise ValueError("--shape is required with --model (e.g. --shape 3 32 32)")
            from fdistill.denoisers import load_denoiser
            denoiser, _ = load_denoiser(args.model, device=args.device)
            shape, default_range, dtype = tuple(args.shape), (0.002, 80.0), torch.float32
        sigma_min = args.sigma_min if args.sigma_min is not None else default_range[0]
        sigma_max = args.sigma_max if args.sigma_max is not None else default_range[1]
        if not 0 < sigma_min < sigma_max or args.grid < 3 or args.num_samples < 2:
            raise ValueError("need 0 < --sigma-min < --sigma-max, --grid >= 3 and --num-samples >= 2")
    except (ValueError, FileNotFoundError) as error:
        print(f"compute_ems: {error}", file=sys.stderr)
        return 2
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), args.grid, dtype=torch.float64)
    stats = compute_ems(denoiser, shape, args.num_samples, lambdas, sampling_steps=args.sampling_steps,
                        batch_size=args.batch_size, seed=args.seed, dtype=dtype, device=args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    print(f"wrote {args.out}: l, s, b of shape {tuple(stats.l.shape)} on lambda in "
          f"[{lambdas[0].item():.3f}, {lambdas[-1].item():.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
