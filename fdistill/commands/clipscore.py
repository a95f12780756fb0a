"""``fdistill clipscore``: CLIP score (Hessel et al. 2021, Eq. 1, w = 100) of images against their prompts.

    fdistill clipscore --images samples/                   # its captions.jsonl, written by `fdistill sample --prompts`
    fdistill clipscore --images gen/ --prompts captions.txt  # image i (sorted by path) <-> prompt i // --per-prompt
    fdistill clipscore --gen path/to/sd-pipeline --prompts captions.txt --guidance 5 --steps 20

Images and captions are streamed batch by batch (memory does not grow with their number). Prints the mean score and
writes it as JSON with --out. Errors are one line: exit 2 for a usage error, 1 for a bad file or a failure while
running.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fdistill.commands import UsageError, bounded_int, one_line
from fdistill.commands.sample_options import MAX_BATCH, add_clip_arguments, add_prompt_arguments, add_sampler_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdistill clipscore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (sorted by path; grid.png skipped)")
    source.add_argument("--gen", help="text-to-image pipeline directory / hub id, sampled on --prompts")
    add_prompt_arguments(parser)
    add_clip_arguments(parser)
    add_sampler_arguments(parser, solver=None, steps=None, solver_help="sampler for --gen (default: fdistill sample's)",
                          steps_help="solver steps for --gen", guidance_help="classifier-free guidance weight (--gen)")
    parser.add_argument("--seed", type=int, default=0, help="image i of --gen uses noise seeded by (seed, i)")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=64)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers reading --images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def folder_captions(args: argparse.Namespace, files: list[Path]) -> list[str]:
    """The caption of each image file: prompt i // --per-prompt of --prompts (its count must match), else the
    folder's captions.jsonl."""
    from fdistill.evaluation.prompts import read_image_captions, read_prompts

    if args.prompts is None:
        return read_image_captions(args.images, files)
    try:
        prompts = read_prompts(args.prompts, args.caption_column)
    except (OSError, ValueError) as error:
        raise UsageError(f"--prompts: {error}") from error
    if len(prompts) * args.per_prompt != len(files):
        raise UsageError(f"--prompts {args.prompts}: {len(prompts)} prompts x --per-prompt {args.per_prompt} != "
                         f"{len(files)} images in {args.images}")
    return [prompts[i // args.per_prompt] for i in range(len(files))]


def scored_batches(args: argparse.Namespace, clip):
    """(iterator of (unit image embeddings [B, d], captions), number of images) of --images or --gen."""
    from fdistill.evaluation.sources import folder_batches, list_images

    if args.gen is not None:
        from fdistill.commands.sample import prompt_pipeline_batches

        if args.prompts is None:
            raise UsageError("--gen needs --prompts (the prompt file to sample)")
        args.num = None
        batches, num = prompt_pipeline_batches(args)
        return ((clip.image_embeddings(images), prompts) for images, prompts in batches), num
    files = list_images(args.images)
    captions = folder_captions(args, files)
    inputs = folder_batches(args.images, clip.preprocess_uint8, args.batch_size, args.workers)
    return ((clip.input_embeddings(pixels), captions[index * args.batch_size:(index + 1) * args.batch_size])
            for index, pixels in enumerate(inputs)), len(files)


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from fdistill.evaluation.clip import load_clip, pair_scores

    clip = load_clip(args.clip_model, args.clip_pretrained, device=args.device)
    batches, num = scored_batches(args, clip)
    total, count = 0.0, 0
    with tqdm(total=num, desc="clip score", unit="img", disable=args.quiet) as progress:
        for image_embeddings, captions in batches:
            total += float(pair_scores(image_embeddings, clip.text_embeddings(captions)).double().sum())
            count += len(captions)
            progress.update(len(captions))
    result = {"clip_score": total / count, "num": count, "clip_model": args.clip_model,
              "source": args.images or args.gen}
    print(f"clip_score: {result['clip_score']:.6g} ({count} images)")
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as error:
            raise OSError(f"cannot write --out {args.out}: {error.strerror or error}") from error
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:          # argparse already printed the message
        return int(exit_.code or 0)
    try:
        run(args)
    except UsageError as error:
        print(f"fdistill clipscore: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError) as error:
        print(f"fdistill clipscore: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0
