"""Where ``fdistill sample``'s images go: PNGs (or one samples.npy) written batch by batch, a grid and the captions
index, a check that nothing non-finite is written, and the processes of ``accelerate launch`` sharing the work."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.commands import UsageError

GRID_MAX = 64                    # the preview grid shows the first images only


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
