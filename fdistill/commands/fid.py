"""``fdistill fid``: FID (and KID, precision/recall) between a generated source and a reference.

    fdistill fid --gen samples/ --ref cifar10/train/32                       # clean-fid's named statistics
    fdistill fid --gen samples.npz --ref real/ --kid --pr --out result.json
    fdistill fid --gen runs/student --steps 1 --num 10000 --ref cifar10/train/32
    fdistill fid --gen edm-cifar10 --ems ems.safetensors --steps 8 --num 50000 --ref cifar10/train/32   # DPM-Solver-v3
    fdistill fid --gen digits_samples/ --ref digits --features digits       # built-in, no download
    fdistill fid --gen path/to/sd-pipeline --prompts captions.txt --guidance 5 --ref coco_val/   # COCO-style FID

``--gen``: image folder, npz of images, or a model directory / hub id (``fdistill.denoisers.load_denoiser``; one-step
generators run their one- or few-step chain (``fdistill.samplers.generator_sample``); denoisers are sampled with ``fdistill.samplers``;
class-conditional models get exactly balanced labels; a text-to-image pipeline with ``--prompts`` is sampled by
``fdistill sample``'s code, one image per prompt, batch by batch into the extractor). ``--ref``: folder, npz of
images or of statistics (mu, sigma), clean-fid name ``name/split/res``, or ``digits``. Prints the metrics and writes
them as JSON with ``--out``.

Inputs are validated: float images in an npz need ``--float-range`` (checked against their values), non-finite
images or statistics and unreadable files are errors naming the file; images of mixed sizes are resized one by one.
The feature extractor's weights are printed (Inception: SHA-256 checked against the published file). Errors are one
line: exit 2 for a usage error (an option), 1 for a bad input file or a failure while running.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fdistill.commands import UsageError, bounded_int, one_line
from fdistill.commands.sample_options import MAX_BATCH, add_clip_arguments, add_prompt_arguments, add_sampler_arguments
from fdistill.evaluation.extractors import EXTRACTORS, build_feature_extractor
from fdistill.evaluation.fid import SourceOptions, compute_metrics
from fdistill.evaluation.preprocess import MODES
from fdistill.evaluation.sources import FLOAT_RANGES, UnstatedRangeError
from fdistill.samplers.config import SamplerConfig

MAX_IMAGES = 10_000_000          # statistics are streamed: the bound only catches typos (1e12)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdistill fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gen", required=True, help="image folder, npz, or model directory / hub id")
    parser.add_argument("--ref", required=True, help="folder, npz (images or mu/sigma), name/split/res, or digits")
    parser.add_argument("--num", type=bounded_int(1, MAX_IMAGES), default=None,
                        help="generated images to use (required for a model)")
    parser.add_argument("--ref-num", type=bounded_int(1, MAX_IMAGES), default=None,
                        help="reference images to use (default all)")
    parser.add_argument("--float-range", choices=list(FLOAT_RANGES), default=None,
                        help="value range of float images in an npz (write --float-range=-1..1 for the negative one)")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=SourceOptions.batch_size)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers decoding and resizing images")
    parser.add_argument("--features", choices=sorted(EXTRACTORS), default="inception")
    parser.add_argument("--mode", choices=MODES, default="clean", help="Inception preprocessing (clean-fid modes)")
    parser.add_argument("--inception-weights", default=None, help="inception-2015-12-05.pt to use knowingly, even if "
                        "its SHA-256 is not the published one (else $FDISTILL_INCEPTION_WEIGHTS, then the verified "
                        "cache or a verified download)")
    add_clip_arguments(parser)
    parser.add_argument("--kid", action="store_true", help="also compute KID (keeps features in memory)")
    parser.add_argument("--pr", action="store_true", help="also compute precision / recall (k = 3)")
    add_sampler_arguments(parser, solver=SamplerConfig.solver, steps=18, solver_help="sampler for a denoiser --gen",
                          steps_help="solver steps for a denoiser --gen",
                          guidance_help="classifier-free guidance weight of a --prompts pipeline (1 = off)")
    parser.add_argument("--ems", default=None, help="DPM-Solver-v3 statistics of a model --gen (scripts/compute_ems.py,"
                        " with its calibrated variants): sample it with dpm_solver_v3 instead of --solver")
    parser.add_argument("--seed", type=int, default=0)
    add_prompt_arguments(parser)                        # a text-to-image --gen pipeline sampled on a prompt file
    parser.add_argument("--no-cache", action="store_true", help="do not read / write cached reference statistics")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def model_generate_fn(path: str, solver: str, steps: int, schedule: str, device: str, ems: str | None = None):
    """``generate_fn(num, generator, cond=None) -> [-1, 1] images`` sampling a model directory / hub id (with
    dpm_solver_v3 and the statistics file ``ems`` when given)."""
    from fdistill.commands.sample import load_ems, report_v3_variant
    from fdistill.denoisers import load_denoiser
    from fdistill.samplers import generator_sample, noise_levels, sample

    denoiser, info = load_denoiser(path, device=device)
    if info.conditioning == "text" or info.components.get("vae"):
        raise ValueError(f"{path}: text-to-image / latent models are not sampled by `fdistill fid`; write images "
                         "with `fdistill sample` and pass that folder as --gen")
    levels = noise_levels(SamplerConfig(solver, steps, schedule, info.sigma_min, info.sigma_max), denoiser)
    options = {} if ems is None else {"ems": load_ems(ems, tuple(info.sample_shape))}
    if options and info.kind == "denoiser":
        report_v3_variant(options["ems"], levels, "fdistill fid")

    @torch.no_grad()
    def generate(num: int, generator: torch.Generator, cond=None) -> torch.Tensor:
        z = torch.randn((num, *info.sample_shape), generator=generator).to(device)
        cond = None if cond is None else cond.to(device)
        if info.kind == "generator":
            chain = info.generator_chain
            renoise = torch.randn((len(chain) - 1, num, *info.sample_shape), generator=generator).to(device)
            return generator_sample(denoiser, z, chain, info.generator_input_scale, renoise, cond).clamp(-1, 1)
        return sample(denoiser, float(levels[0]) * z, levels, solver=solver, cond=cond, **options).clamp(-1, 1)

    return generate, info


def _gen_source(args):
    """(source, num_classes) for --gen: a path to images as is, or a model's generate_fn."""
    path = Path(args.gen)
    if path.is_dir() and not any((path / name).is_file() for name in ("fdistill.json", "model_index.json",
                                                                        "config.json")):
        return args.gen, None
    if path.suffix == ".npz":
        return args.gen, None
    if not path.exists() and (path.is_absolute() or args.gen.count("/") != 1):
        raise FileNotFoundError(f"--gen {args.gen}: no such image folder, npz or model directory "
                                "(hub ids look like org/name)")
    if args.num is None:
        raise UsageError("--num is required when --gen is a model")
    generate, info = model_generate_fn(args.gen, args.solver, args.steps, args.schedule, args.device, args.ems)
    return generate, info.num_classes if info.conditioning == "class" else None


def _write_json(path: Path, result: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as error:
        raise OSError(f"cannot write --out {path}: {error.strerror or error}") from error


def run(args: argparse.Namespace) -> dict:
    if args.ems is not None:
        args.solver = "dpm_solver_v3"                  # --ems selects it, as in fdistill sample
    if args.prompts is not None:
        from fdistill.commands.sample import prompt_pipeline_batches

        batches, args.num = prompt_pipeline_batches(args)
        gen, num_classes = (images for images, _ in batches), None
    else:
        gen, num_classes = _gen_source(args)
    options = SourceOptions(args.batch_size, args.workers, args.device, not args.quiet, args.seed, num_classes,
                            float_range=args.float_range)
    extractor = build_feature_extractor(args.features, args.mode, inception_weights=args.inception_weights,
                                        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
    print(f"features: {extractor.name}, weights {extractor.weights_note}", file=sys.stderr)
    result = compute_metrics(gen, args.ref, extractor, args.mode, args.num, args.ref_num, args.kid, args.pr,
                             options, cache=not args.no_cache)
    result = {**result, "features": args.features, "mode": args.mode, "gen": args.gen, "ref": args.ref,
              "weights": extractor.weights_id}
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        if key in result:
            print(f"{key}: {result[key]:.6g}")
    if args.out:
        _write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, UnstatedRangeError) as error:
        print(f"fdistill fid: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:            # FileNotFoundError and disk full are OSErrors
        print(f"fdistill fid: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0
