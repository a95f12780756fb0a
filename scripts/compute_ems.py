"""Compute DPM-Solver-v3's empirical model statistics (EMS) for a model and save them (safetensors), optionally with
the solver variant calibrated for the step counts you will sample with.

    python scripts/compute_ems.py --model path/to/model --out ems.safetensors --calibrate 5 6 8 10
    python scripts/compute_ems.py --teacher mixture_mild --out ems.safetensors   # an analytic teacher of the bench
    fdistill sample --model path/to/model --ems ems.safetensors --steps 8 --out samples/

The lambda grid is uniform in lambda = -log sigma over [-log sigma_max, -log sigma_min] (``--grid`` points; the
range defaults to the model's own, as ``fdistill sample`` uses); the model's data samples come from the model itself
(dpmpp_3m, ``--sampling-steps``), with classes cycling 0, 1, ... for a class-conditional model (as ``fdistill
sample`` draws them) and the empty prompt for a text-conditioned one. ``--num-samples`` defaults to 4096, the authors' size for EDM models (their code
uses 1024-4096): on 8 held-out mixtures (scripts/bench_v3_heldout.py) 4096 samples instead of 256 change
DPM-Solver-v3's geometric-mean error by x0.89-0.99 at 4-10 steps and x0.62 / x0.43 at 15 / 20 steps; on the
learned digits teacher by less than 2 %.

``--calibrate STEPS...`` then picks, for each step count and ``--schedules`` entry, the most accurate
``dpm_solver_v3`` variant on ``--calibration-samples`` other starts against a fine ODE solve
(``fdistill.samplers.v3_calibration``) and stores it in the file; ``fdistill sample --ems`` (and
``sample(..., solver="dpm_solver_v3", ems=ModelStatistics.load(path))``) apply it on the same sigma list.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from fdistill.samplers import SamplerConfig, calibrate_dpm_solver_v3, compute_ems, noise_levels
from fdistill.samplers.config import SCHEDULES

BENCH_SIGMA_RANGE = (0.029167, 14.614641)     # scripts/bench_samplers.py: Stable Diffusion's sigma range


def bench_teacher(name: str):
    """(denoiser, sample shape) of a teacher of scripts/bench_samplers.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_samplers_teachers import TEACHERS
    if name not in TEACHERS:
        raise ValueError(f"unknown --teacher {name!r}; allowed: {', '.join(TEACHERS)}")
    build, dim, _ = TEACHERS[name]
    return build()[0], (dim,)


def class_labels(count: int, num_classes: int | None, device: str) -> torch.Tensor | None:
    """Labels 0, 1, ..., num_classes - 1, 0, ... for a class-conditional model (``fdistill sample``'s default
    classes), None for the others (text-conditioned models get the empty condition)."""
    return None if num_classes is None else (torch.arange(count) % num_classes).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model directory or hub id (fdistill.denoisers.load_denoiser)")
    source.add_argument("--teacher", help="an analytic teacher of scripts/bench_samplers.py")
    parser.add_argument("--shape", type=int, nargs="+", help="shape of one sample (default: the model's)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=121, help="number of lambda grid points")
    parser.add_argument("--sigma-min", type=float, default=None, help="default: the model's")
    parser.add_argument("--sigma-max", type=float, default=None, help="default: the model's")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--calibrate", type=int, nargs="*", default=[], metavar="STEPS",
                        help="step counts to calibrate dpm_solver_v3's variant for (e.g. 5 6 8 10)")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=[SamplerConfig.schedule],
                        help="sigma schedules to calibrate (fdistill sample --schedule)")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="EMS samples; the calibration uses seed + 1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        num_classes = None
        if args.teacher is not None:
            denoiser, shape = bench_teacher(args.teacher)
            default_range, dtype = BENCH_SIGMA_RANGE, torch.float64
        else:
            from fdistill.denoisers import load_denoiser
            denoiser, info = load_denoiser(args.model, device=args.device)
            shape = tuple(args.shape) if args.shape else tuple(info.sample_shape)
            default_range, dtype = (info.sigma_min, info.sigma_max), torch.float32
            num_classes = info.num_classes if info.conditioning == "class" else None
        sigma_min = args.sigma_min if args.sigma_min is not None else default_range[0]
        sigma_max = args.sigma_max if args.sigma_max is not None else default_range[1]
        if not 0 < sigma_min < sigma_max or args.grid < 3 or args.num_samples < 2:
            raise ValueError("need 0 < --sigma-min < --sigma-max, --grid >= 3 and --num-samples >= 2")
        if any(steps < 1 for steps in args.calibrate) or args.calibration_samples < 1:
            raise ValueError("--calibrate step counts and --calibration-samples must be >= 1")
    except (ValueError, FileNotFoundError) as error:
        print(f"compute_ems: {error}", file=sys.stderr)
        return 2
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), args.grid, dtype=torch.float64)
    labels = class_labels(args.num_samples, num_classes, args.device)
    stats = compute_ems(denoiser, shape, args.num_samples, lambdas, labels, sampling_steps=args.sampling_steps,
                        batch_size=args.batch_size, seed=args.seed, dtype=dtype, device=args.device, progress=True)
    if args.calibrate:
        lists = {(kind, steps): tuple(noise_levels(SamplerConfig(steps=steps, schedule=kind, sigma_min=sigma_min,
                                                                 sigma_max=sigma_max), denoiser).tolist())
                 for kind in args.schedules for steps in args.calibrate}   # as fdistill sample builds them
        noise = torch.randn(args.calibration_samples, *shape, generator=torch.Generator().manual_seed(args.seed + 1),
                            dtype=torch.float64).to(args.device)
        stats, report = calibrate_dpm_solver_v3(denoiser, stats, noise, list(lists.values()),
                                                class_labels(args.calibration_samples, num_classes, args.device),
                                                progress=True)
        for (kind, steps), sigmas in lists.items():
            print(f"{kind} {steps} steps: {stats.calibration[sigmas]} (median L2 error "
                  + ", ".join(f"{name} {error:.3g}" for name, error in report[sigmas].items()) + ")")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    print(f"wrote {args.out}: l, s, b of shape {tuple(stats.l.shape)} on lambda in "
          f"[{lambdas[0].item():.3f}, {lambdas[-1].item():.3f}], {len(stats.calibration)} calibrated sigma lists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
