"""``fdistill sample``: draw samples from a model with a DPM-Solver-family sampler; write PNGs and a grid.

    fdistill sample --model digits-exact --num 64 --solver dpmpp_2m --steps 10 --out samples/
    fdistill sample --model runs/student --num 16 --out student/               # one-step generator: 1 step
    fdistill sample --model path/to/sd-pipeline --prompt "a red square" --guidance 5 --out sd/
    fdistill sample --model path/to/sd-pipeline --prompts captions.txt --per-prompt 2 --out coco/

Images are written batch by batch (memory does not grow with --num). With --prompts (fdistill.evaluation.prompts:
txt / json / jsonl / parquet) image i shows prompt i // --per-prompt, and captions.jsonl maps each file to its prompt.

Reproducibility: image i always starts from noise drawn from a generator seeded by (seed, i), and its class (when
not fixed by --class) is i mod num_classes, so the images do not depend on --batch-size. (dpmpp_2m_sde also draws
noise during sampling, per batch: its images depend on the batch size.)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from fdistill.commands import UsageError, bounded_int, finite_float, one_line
from fdistill.denoisers import ClassifierFreeGuidance
from fdistill.evaluation.prompts import DEFAULT_CAPTION_COLUMN
from fdistill.pipelines import decode_latents

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_NUM = 10_000_000             # images are written batch by batch: the bound only catches typos (1e12)
DEFAULT_NUM = 64                 # images without --prompts
GRID_MAX = 64                    # the preview grid shows the first images only
MAX_STEPS = 1000                 # a training schedule's length; more steps only cost time
MAX_BATCH = 65_536


@dataclass
class Model:
    """A loaded model with what sampling needs besides the denoiser.

    Attributes:
        denoiser: D(x, sigma, cond) -> x0.
        info: fdistill.denoisers.io.ModelInfo.
        uncond: null condition for a condition (classifier-free guidance), None for unconditional models.
        encode_prompts: captions -> the denoiser's cond (text models), else None.
        decode: model samples -> images in [-1, 1] (a VAE for latent models, identity otherwise).
    """

    denoiser: nn.Module
    info: Any
    uncond: Callable[[Any], Any] | None = None
    encode_prompts: Callable[[list[str]], Any] | None = None
    decode: Callable[[Tensor], Tensor] = lambda x: x


# ------------------------------------------------------------------------------------------------ models


def digits_exact(dtype: torch.dtype, device: str) -> Model:
    """The ideal denoiser of sklearn's 1,797 digits (8x8, labels): exact, offline, no file needed."""
    from fdistill.data.builtin import digits_images
    from fdistill.denoisers import EmpiricalDenoiser
    from fdistill.denoisers.io import ModelInfo

    images, labels = digits_images(8)
    info = ModelInfo(sample_shape=(1, 8, 8), num_classes=10, conditioning="class", sigma_min=0.002, sigma_max=80.0,
                     wrapper="analytic", source="digits-exact")
    return Model(EmpiricalDenoiser(images, labels).to(device), info, uncond=lambda cond: None)


BUILTIN_MODELS: dict[str, Callable[[torch.dtype, str], Model]] = {"digits-exact": digits_exact}


def _prompt_encoder(denoiser: nn.Module, components: dict[str, tuple[str, str]], image_size: int, device: str):
    """captions -> UNet conditioning with the pipeline's CLIP text encoder(s) (fdistill.pipelines). The empty
    prompt's encoding becomes the denoiser's null condition (classifier-free guidance)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fdistill.pipelines import SDComponents, encode_prompts, sdxl_time_ids, unet_conditioning

    def part(cls, name):
        loaded = cls.from_pretrained(components[name][0], subfolder=components[name][1])
        return loaded.to(device).eval() if isinstance(loaded, nn.Module) else loaded
    sdxl = "text_encoder_2" in components
    parts = SDComponents(unet=None, vae=None, scheduler=None, tokenizer=part(CLIPTokenizer, "tokenizer"),
                         text_encoder=part(CLIPTextModel, "text_encoder"),
                         tokenizer_2=part(CLIPTokenizer, "tokenizer_2") if sdxl else None,
                         text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2") if sdxl else None)

    @torch.no_grad()
    def encode(captions: list[str]) -> Any:
        embeds, pooled = encode_prompts(parts, captions)
        size = (image_size, image_size)
        return unet_conditioning(embeds, pooled, sdxl_time_ids(size, (0, 0), size, len(captions)) if sdxl else None)

    denoiser.null_cond = encode([""])
    return encode


def load_model(name: str, dtype: torch.dtype, device: str) -> Model:
    """A built-in model by name, or a model directory / hub id (fdistill.denoisers.load_denoiser) with its VAE and
    text encoders when it is a latent text-to-image pipeline."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](dtype, device)
    from fdistill.denoisers import load_denoiser

    try:
        denoiser, info = load_denoiser(name, dtype=None if dtype == torch.float32 else dtype, device=device)
    except FileNotFoundError as error:
        raise UsageError(f"--model: {error}; give a model directory, a hub id or a built-in model: "
                         f"{', '.join(BUILTIN_MODELS)}") from error
    model = Model(denoiser, info, uncond=getattr(denoiser, "uncond", None))
    image_size = info.sample_shape[-1]
    if "vae" in info.components:
        from diffusers import AutoencoderKL

        root, subfolder = info.components["vae"]
        vae = AutoencoderKL.from_pretrained(root, subfolder=subfolder).to(device).eval()
        image_size *= 2 ** (len(vae.config.block_out_channels) - 1)
        model.decode = functools.partial(decode_latents, vae)
    if info.conditioning == "text":
        if "text_encoder" not in info.components:
            raise UsageError(f"--model {name}: a text-conditioned model needs its pipeline's text_encoder/tokenizer")
        if getattr(denoiser, "model_class", None) == "FluxTransformer2DModel":
            raise UsageError(f"--model {name}: fdistill sample does not encode Flux prompts yet; run the directory "
                             "with diffusers.FluxPipeline (its fdistill.json 'diffusers_call')")
        if "text_encoder_3" in info.components:     # SD3's CLIP + CLIP + T5 (fdistill.flow_pipelines)
            from fdistill.flow_pipelines import sd3_prompt_encoder
            model.encode_prompts = sd3_prompt_encoder(denoiser, info.components, device)
        else:
            model.encode_prompts = _prompt_encoder(denoiser, info.components, image_size, device)
    return model


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
    from fdistill.samplers import SamplerConfig, noise_levels as sampler_noise_levels

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
            options = {}
            if solver == "dpmpp_2m_sde":
                options["generator"] = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + start)
            x = sample(denoiser, levels[0].item() * noise, levels.to(args.device), solver=solver, cond=cond,
                       **options)
        return model.decode(x).float().cpu()


def guided(model: Model, scale: float) -> nn.Module:
    """The denoiser with classifier-free guidance of weight ``scale`` (1 = none)."""
    if scale == 1.0:
        return model.denoiser
    if model.info.conditioning == "none":
        raise UsageError("--guidance needs a conditional model (class labels or text); this model is unconditional")
    return ClassifierFreeGuidance(model.denoiser, scale, uncond=model.uncond)


# ------------------------------------------------------------------------------------------------ command line


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompts, --caption-column, --per-prompt (shared with ``fdistill fid`` and ``fdistill clipscore``)."""
    parser.add_argument("--prompts", default=None,
                        help="prompt file, one image per prompt: .txt lines, .json/.jsonl strings or objects, .parquet")
    parser.add_argument("--caption-column", default=DEFAULT_CAPTION_COLUMN,
                        help="field / column holding the prompt in a .json, .jsonl or .parquet --prompts file")
    parser.add_argument("--per-prompt", type=bounded_int(1, MAX_NUM), default=1, help="images per --prompts prompt")


def build_parser() -> argparse.ArgumentParser:
    from fdistill.samplers import SIGMA_SCHEDULES, SOLVERS

    parser = argparse.ArgumentParser(prog="fdistill sample", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"model directory, Diffusers pipeline / hub id, or built-in: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--num", type=bounded_int(1, MAX_NUM), default=None,
                        help=f"number of images (default {DEFAULT_NUM}; with --prompts: prompts x --per-prompt)")
    parser.add_argument("--solver", choices=list(SOLVERS), default=None,
                        help="sampler (None: the most accurate one for --steps, fdistill.samplers.recommended_solver)")
    parser.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=None,
                        help="solver steps (default 1 for one-step generators, 20 otherwise)")
    parser.add_argument("--schedule", choices=list(SIGMA_SCHEDULES), default="karras", help="noise-level spacing")
    parser.add_argument("--sigma-min", type=float, default=None, help="smallest noise level (default: the model's)")
    parser.add_argument("--sigma-max", type=float, default=None, help="largest noise level (default: the model's)")
    parser.add_argument("--guidance", type=finite_float, default=1.0, help="classifier-free guidance weight (1 = off)")
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


def check_arguments(model: Model, args: argparse.Namespace) -> None:
    """Reject options that do not fit the model, naming the option and what is allowed."""
    info = model.info
    if args.steps is None:
        args.steps = len(info.generator_chain) if info.kind == "generator" else 20
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


class SampleWriter:
    """Writes images batch by batch as they are drawn, so memory does not depend on the number of images.

    Images [B, C, H, W] with C in (1, 3) become ``{index:06d}.png``; at ``finish`` (main process, once every
    process has written its share) the first ``GRID_MAX`` PNGs are read back into ``grid.png`` and, with prompts,
    ``captions.jsonl`` maps each file to its prompt. Anything else (point data [B, D], latents of a model without
    a VAE) fills ``samples.npy`` [num, ...] through a memory map (one process only).
    """

    def __init__(self, out: Path, num: int, num_processes: int = 1):
        self.out, self.num, self.num_processes = out, num, num_processes
        self.array = None
        out.mkdir(parents=True, exist_ok=True)

    def write(self, start: int, images: Tensor) -> None:
        """Write images start .. start + len(images) - 1."""
        from fdistill.images import save_images

        if images.ndim == 4 and images.shape[1] in (1, 3):
            save_images(images, self.out, start_index=start)
            return
        if self.num_processes > 1:
            raise UsageError(f"samples of shape {tuple(images.shape[1:])} go to one samples.npy, written by one "
                             "process: run without `accelerate launch`")
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.out / "samples.npy", mode="w+", dtype=np.float32,
                                                   shape=(self.num, *images.shape[1:]))
        self.array[start:start + len(images)] = images.numpy()

    def finish(self, prompts: list[str] | None) -> str:
        """Flush samples.npy, or write grid.png (and captions.jsonl for ``prompts`` [num]); a summary line."""
        from fdistill.evaluation.prompts import CAPTIONS_FILENAME
        from fdistill.images import GRID_FILENAME, image_filename, load_images, save_grid

        if self.array is not None:
            self.array.flush()
            return f"wrote {self.num} samples of shape {tuple(self.array.shape[1:])} to {self.out / 'samples.npy'}"
        preview = torch.cat([load_images(self.out, image_filename(index)) for index in range(min(GRID_MAX, self.num))])
        save_grid(preview, self.out / GRID_FILENAME, upscale=max(1, 128 // preview.shape[-1]))
        if prompts is not None:
            with open(self.out / CAPTIONS_FILENAME, "w", encoding="utf-8") as index:
                index.writelines(json.dumps({"file": image_filename(i), "caption": prompt}) + "\n"
                                 for i, prompt in enumerate(prompts))
        return f"wrote {self.num} images and {GRID_FILENAME} to {self.out}"


def require_finite(images: Tensor, start: int, args: argparse.Namespace) -> Tensor:
    """``images`` (images start .. start + len - 1) when finite; else a FloatingPointError naming the settings
    (NaN would otherwise be written as black images)."""
    bad = ~torch.isfinite(images)
    if bad.any():
        raise FloatingPointError(
            f"sampling produced {int(bad.sum())} non-finite values (NaN / inf) in images {start} .. "
            f"{start + len(images) - 1} of --model {args.model} (--solver {args.solver}, --steps {args.steps}, "
            f"--guidance {args.guidance}, --dtype {args.dtype}); images from {start} on not written")
    return images


def prepare(args: argparse.Namespace) -> tuple[Model, nn.Module, Tensor | None]:
    """Resolve --prompts / --num, load the model and check the options: (model, guided denoiser, noise levels)."""
    resolve_prompts(args)
    model = load_model(args.model, DTYPES[args.dtype], args.device)
    check_arguments(model, args)
    levels = noise_levels(model, args) if model.info.kind == "denoiser" else None
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
    steps, schedule, seed, batch_size, device); the others take this command's defaults."""
    if options.num is not None:
        raise UsageError("--num and --prompts: the number of images is prompts x --per-prompt; drop --num")
    args = build_parser().parse_args(["--model", options.gen, "--out", "unused"])       # this command's defaults
    for name in ("prompts", "caption_column", "per_prompt", "guidance", "solver", "steps", "schedule", "seed",
                 "batch_size", "device"):
        setattr(args, name, getattr(options, name))
    args.no_progress = True                             # the caller's feature-extraction bar shows the ETA
    model, denoiser, levels = prepare(args)             # refuses --prompts for a model without text conditioning
    batches = ((images, image_prompts(args, start, len(images)))
               for start, images in image_batches(model, denoiser, args, levels))
    return batches, args.num


class _OneProcess:
    """The process state of a run that was not launched with several processes."""
    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


def launched_processes(args: argparse.Namespace):
    """accelerate's PartialState when started by ``accelerate launch`` / torchrun with several processes (then
    ``args.device`` becomes this process's device), else a one-process stand-in; accelerate's state is a process
    singleton, so it is not created when there is nothing to share (an in-process call keeps it untouched)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _OneProcess()
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")
    args.device = str(state.device)
    return state


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
