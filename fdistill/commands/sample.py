"""``fdistill sample``: draw samples from a model with a DPM-Solver-family sampler; write PNGs and a grid.

    fdistill sample --model digits-exact --num 64 --solver dpmpp_2m --steps 10 --out samples/
    fdistill sample --model runs/student --num 16 --out student/               # one-step generator: 1 step
    fdistill sample --model path/to/sd-pipeline --prompt "a red square" --guidance 5 --out sd/
    fdistill sample --model path/to/sd-pipeline --prompts captions.txt --per-prompt 2 --out coco/
    fdistill sample --model path/to/flux-pipeline --prompt "a red square" --embedded-guidance 3.5 --out flux/

Images are written batch by batch (memory does not grow with --num). With --prompts (fdistill.evaluation.prompts:
txt / json / jsonl / parquet) image i shows prompt i // --per-prompt, and captions.jsonl maps each file to its prompt.

Reproducibility: image i always starts from noise drawn from a generator seeded by (seed, i), and its class (when
not fixed by --class) is i mod num_classes, so the images do not depend on --batch-size. (dpmpp_2m_sde also draws
noise during sampling, per batch: its images depend on the batch size.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fdistill.commands import UsageError, bounded_int, finite_float, one_line
from fdistill.commands.sample_models import BUILTIN_MODELS, DTYPES, Model, guided, load_model
from fdistill.commands.sample_options import (MAX_BATCH, MAX_NUM, add_prompt_arguments,
                                              add_sampler_arguments)
from fdistill.commands.sample_output import SampleWriter, launched_processes, require_finite
from fdistill.flow_pipelines import FLUX_GUIDANCE
from fdistill.samplers.config import SamplerConfig

DEFAULT_NUM = 64                 # images without --prompts


# ------------------------------------------------------------------------------------------------ sampling


def image_noise(seed: int, start: int, count: int, shape: tuple[int, ...], stream: int = 0) -> Tensor:
    """Standard normal noise [count, *shape] (float32, CPU) for images start .. start + count - 1; image i uses a
    generator seeded by (seed, i) alone (and ``stream`` > 0: the re-noising of a few-step generator's step), so a
    batch's noise does not depend on how images are batched."""
    noise = torch.empty(count, *shape)
    for offset in range(count):
        entropy = [seed, start + offset] + ([stream] if stream else [])
        state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        noise[offset] = torch.randn(shape, generator=generator)
    return noise


def image_prompts(args: argparse.Namespace, start: int, count: int) -> list[str]:
    """The prompts of images start .. start + count - 1: image i shows prompts[i // per_prompt] of --prompts,
    else --prompt."""
    if args.prompt_list is None:
        return [args.prompt] * count
    return [args.prompt_list[i // args.per_prompt] for i in range(start, start + count)]


def batch_condition(model: Model, args: argparse.Namespace, start: int, count: int) -> Any:
    """The cond of images start .. start + count - 1: --class, else classes cycling i mod num_classes; prompts."""
    info = model.info
    if info.conditioning == "class":
        labels = torch.arange(start, start + count) % info.num_classes if args.class_label is None \
            else torch.full((count,), args.class_label)
        return labels.to(args.device)
    if info.conditioning == "text":
        return model.encode_prompts(image_prompts(args, start, count))
    return None


def noise_levels(model: Model, args: argparse.Namespace) -> Tensor:
    """The sampler's decreasing sigmas (ending at 0), defaults from the model's noise range."""
    from fdistill.samplers import noise_levels as sampler_noise_levels

    sigma_min = args.sigma_min if args.sigma_min is not None else model.info.sigma_min
    sigma_max = args.sigma_max if args.sigma_max is not None else model.info.sigma_max
    try:
        config = SamplerConfig(solver=args.solver, steps=args.steps, schedule=args.schedule, sigma_min=sigma_min,
                               sigma_max=sigma_max)
        return sampler_noise_levels(config, model.denoiser)
    except ValueError as error:
        raise UsageError(str(error)) from error


def draw(model: Model, denoiser: nn.Module, args: argparse.Namespace, levels: Tensor, start: int,
         count: int) -> Tensor:
    """Images start .. start + count - 1 in data space (decoded), [count, *shape] on the CPU."""
    from fdistill.samplers import generator_sample, recommended_solver, sample

    cond = batch_condition(model, args, start, count)
    noise = image_noise(args.seed, start, count, tuple(model.info.sample_shape)).to(args.device)
    with torch.no_grad():
        if model.info.kind == "generator":
            chain = model.info.generator_chain
            renoise = torch.stack([image_noise(args.seed, start, count, tuple(model.info.sample_shape), stream=k)
                                   for k in range(1, len(chain))]).to(args.device) if len(chain) > 1 else None
            x = generator_sample(denoiser, noise, chain, model.info.generator_input_scale, renoise, cond)
        else:
            solver = args.solver or recommended_solver(args.steps)
            options = dict(args.solver_options)
            if solver == "dpmpp_2m_sde":
                options["generator"] = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + start)
            x = sample(denoiser, levels[0].item() * noise, levels.to(args.device), solver=solver, cond=cond,
                       **options)
        return model.decode(x).float().cpu()


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdistill sample", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"model directory, Diffusers pipeline / hub id, or built-in: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--num", type=bounded_int(1, MAX_NUM), default=None,
                        help=f"number of images (default {DEFAULT_NUM}; with --prompts: prompts x --per-prompt)")
    add_sampler_arguments(parser, solver=None, steps=None,
                          solver_help="sampler (None: the most accurate one for --steps, "
                                      "fdistill.samplers.recommended_solver)",
                          steps_help="solver steps (default: a generator's own steps, SamplerConfig.steps otherwise)",
                          guidance_help="classifier-free guidance weight (1 = off)")
    parser.add_argument("--embedded-guidance", type=finite_float, default=FLUX_GUIDANCE,
                        help="guidance-distilled Flux (guidance_embeds): the guidance value the transformer takes as "
                             "an input, FluxPipeline's guidance_scale (--guidance is classifier-free guidance on top)")
    parser.add_argument("--ems", default=None, help="DPM-Solver-v3 statistics of this model (scripts/compute_ems.py"
                        " output, with the variant calibrated per step count if --calibrate was given); implies "
                        "--solver dpm_solver_v3, which needs it")
    parser.add_argument("--sigma-min", type=float, default=None, help="smallest noise level (default: the model's)")
    parser.add_argument("--sigma-max", type=float, default=None, help="largest noise level (default: the model's)")
    parser.add_argument("--class", dest="class_label", type=int, default=None,
                        help="class label of all images (default: classes cycle 0, 1, ...)")
    parser.add_argument("--prompt", default="", help="text prompt (text-to-image models)")
    add_prompt_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="image i uses noise seeded by (seed, i)")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=64, help="images per forward batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="network compute dtype")
    parser.add_argument("--out", required=True, help="output directory (000000.png ..., grid.png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def load_ems(path: str, sample_shape: tuple[int, ...]):
    """The ``ModelStatistics`` of an --ems file for samples of ``sample_shape``; a missing, unreadable or foreign
    file is a UsageError naming it."""
    from fdistill.samplers import ModelStatistics
    try:
        statistics = ModelStatistics.load(path)
        statistics.check_sample_shape(sample_shape)
    except (OSError, ValueError) as error:
        raise UsageError(f"--ems {path}: {error}") from error
    return statistics


def report_v3_variant(statistics, levels: Tensor, command: str) -> None:
    """Say on stderr which DPM-Solver-v3 variant the --ems file gives on these noise levels."""
    variant = statistics.calibrated_variant(levels.tolist())
    print(f"{command}: dpm_solver_v3, " + (
        f"variant {variant!r} calibrated for this sigma list" if variant else
        "step-count defaults (--ems has no calibration for this schedule, range and step count: "
        "scripts/compute_ems.py --calibrate)"), file=sys.stderr)


def solver_options(args: argparse.Namespace, sample_shape: tuple[int, ...]) -> dict:
    """{"ems": statistics} from --ems (which selects dpm_solver_v3); {} for the other solvers."""
    if args.ems is None:
        if args.solver == "dpm_solver_v3":
            raise UsageError("--solver dpm_solver_v3 needs --ems PATH, the model's statistics (scripts/compute_ems.py)")
        return {}
    if args.solver not in (None, "dpm_solver_v3"):
        raise UsageError(f"--ems is for --solver dpm_solver_v3, not --solver {args.solver}")
    args.solver = "dpm_solver_v3"
    return {"ems": load_ems(args.ems, sample_shape)}


def check_arguments(model: Model, args: argparse.Namespace) -> None:
    """Reject options that do not fit the model, naming the option and what is allowed."""
    info = model.info
    args.solver_options = solver_options(args, tuple(info.sample_shape))
    if args.steps is None:
        args.steps = len(info.generator_chain) if info.kind == "generator" else SamplerConfig.steps
    if info.kind == "generator" and args.steps != len(info.generator_chain):
        raise UsageError(f"--steps {args.steps}: {args.model} is a {len(info.generator_chain)}-step generator; "
                         f"allowed: --steps {len(info.generator_chain)}")
    if args.class_label is not None and info.conditioning != "class":
        raise UsageError(f"--class: {args.model} is not class-conditional (conditioning: {info.conditioning})")
    if args.class_label is not None and not 0 <= args.class_label < info.num_classes:
        raise UsageError(f"--class {args.class_label}: allowed 0 .. {info.num_classes - 1}")
    for option in ("prompt", "prompts"):
        if getattr(args, option) and info.conditioning != "text":
            raise UsageError(f"--{option}: {args.model} is not a text-conditioned model "
                             f"(conditioning: {info.conditioning})")


def resolve_prompts(args: argparse.Namespace) -> None:
    """Read --prompts into ``args.prompt_list`` and set ``args.num`` (prompts x --per-prompt, or --num / the
    default); conflicting options and unreadable prompt files are usage errors naming the option."""
    from fdistill.evaluation.prompts import read_prompts

    args.prompt_list = None
    if args.prompts is None:
        if args.per_prompt != 1:
            raise UsageError("--per-prompt needs --prompts")
        args.num = DEFAULT_NUM if args.num is None else args.num
        return
    if args.prompt:
        raise UsageError("--prompt and --prompts: give one of them")
    if args.num is not None:
        raise UsageError("--num and --prompts: the number of images is prompts x --per-prompt; drop --num")
    try:
        args.prompt_list = read_prompts(args.prompts, args.caption_column)
    except (OSError, ValueError) as error:
        raise UsageError(f"--prompts: {error}") from error
    args.num = len(args.prompt_list) * args.per_prompt
    if args.num > MAX_NUM:
        raise UsageError(f"--prompts x --per-prompt = {args.num:,} images; allowed at most {MAX_NUM:,}")


def prepare(args: argparse.Namespace) -> tuple[Model, nn.Module, Tensor | None]:
    """Resolve --prompts / --num, load the model and check the options: (model, guided denoiser, noise levels)."""
    resolve_prompts(args)
    model = load_model(args.model, DTYPES[args.dtype], args.device, args.embedded_guidance)
    check_arguments(model, args)
    levels = noise_levels(model, args) if model.info.kind == "denoiser" else None
    if levels is not None and "ems" in args.solver_options:
        report_v3_variant(args.solver_options["ems"], levels, "fdistill sample")
    return model, guided(model, args.guidance), levels


def image_batches(model: Model, denoiser: nn.Module, args: argparse.Namespace, levels: Tensor | None,
                  rank: int = 0, num_processes: int = 1):
    """Yield (start, images [count, ...] in data space on the CPU) for images 0 .. args.num - 1, one batch at a
    time (nothing is kept), with a progress bar (ETA) unless args.no_progress. Process ``rank`` of
    ``num_processes`` takes batches rank, rank + num_processes, ...: images depend on their index only, so the
    processes together draw the one-process images."""
    from tqdm.auto import tqdm

    starts = range(rank * args.batch_size, args.num, num_processes * args.batch_size)
    share = sum(min(args.batch_size, args.num - start) for start in starts)
    with tqdm(total=share, desc="sampling", unit="img", disable=args.no_progress or rank > 0) as progress:
        for start in starts:
            count = min(args.batch_size, args.num - start)
            yield start, require_finite(draw(model, denoiser, args, levels, start, count), start, args)
            progress.update(count)


def prompt_pipeline_batches(options: argparse.Namespace):
    """(iterator of (images [B, C, H, W] in [-1, 1], their prompts), number of images) of the text-to-image
    pipeline ``options.gen`` on ``options.prompts``, drawn by this command's code (same options -> the images
    ``fdistill sample`` writes) and streamed: nothing is kept or written. ``options`` holds the sampling options
    of ``fdistill fid`` / ``fdistill clipscore`` (gen, num, prompts, caption_column, per_prompt, guidance, solver,
    steps, schedule, seed, batch_size, device, and ems if present); the others take this command's defaults."""
    if options.num is not None:
        raise UsageError("--num and --prompts: the number of images is prompts x --per-prompt; drop --num")
    args = build_parser().parse_args(["--model", options.gen, "--out", "unused"])       # this command's defaults
    for name in ("prompts", "caption_column", "per_prompt", "guidance", "solver", "steps", "schedule", "seed",
                 "batch_size", "device"):
        setattr(args, name, getattr(options, name))
    args.ems = getattr(options, "ems", None)            # fdistill fid --ems (which set solver to dpm_solver_v3)
    args.no_progress = True                             # the caller's feature-extraction bar shows the ETA
    model, denoiser, levels = prepare(args)             # refuses --prompts for a model without text conditioning
    batches = ((images, image_prompts(args, start, len(images)))
               for start, images in image_batches(model, denoiser, args, levels))
    return batches, args.num


def run(args: argparse.Namespace) -> str:
    """Sample and write; under ``accelerate launch`` each process draws and writes its share of the batches."""
    state = launched_processes(args)
    model, denoiser, levels = prepare(args)
    try:
        writer = SampleWriter(Path(args.out), args.num, state.num_processes)
        for start, images in image_batches(model, denoiser, args, levels, state.process_index, state.num_processes):
            writer.write(start, images)
        state.wait_for_everyone()
        summary = writer.finish(image_prompts(args, 0, args.num) if args.prompt_list is not None else None) \
            if state.is_main_process else ""
        state.wait_for_everyone()
        return summary
    except OSError as error:                      # disk full, read-only or missing permissions
        raise OSError(f"cannot write --out {error.filename or args.out}: {error.strerror or error}") from error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:          # argparse already printed the message (bad choice, bad int, --help)
        return int(exit_.code or 0)
    try:
        summary = run(args)
        if summary:                      # the main process reports; the others of `accelerate launch` stay quiet
            print(summary)
    except UsageError as error:
        print(f"fdistill sample: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError) as error:     # bad model files, disk full, NaN samples
        print(f"fdistill sample: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0
