"""The ``fdistill`` command: one entry point, one sub-command per job.

Each sub-command lives in ``fdistill.commands.<name>`` and exposes ``main(argv: list[str]) -> int``; modules are
imported only when their command runs, so ``fdistill --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "distill": ("fdistill.commands.distill", "distill a one-step generator (f-distill); default: built-in digits on CPU"),
    "train": ("fdistill.commands.train", "train with a Hydra config: method=denoising|fdistill|ddo|diffusion_dpo"),
    "sample": ("fdistill.commands.sample", "draw samples from a model with a DPM-Solver sampler and save PNGs + a grid"),
    "fid": ("fdistill.commands.fid", "FID / KID / precision-recall between image folders, statistics files or a model"),
    "clipscore": ("fdistill.commands.clipscore", "CLIP score of an image folder or a text-to-image pipeline on prompts"),
    "plot": ("fdistill.commands.plot", "training curves (loss, metrics, LR) of a run directory as a PNG"),
    "completion": ("fdistill.commands.completion", "print a bash completion script: eval \"$(fdistill completion bash)\""),
    "push": ("fdistill.commands.push", "upload a run's export (model + model card) to the Hugging Face Hub"),
}


def usage() -> str:
    lines = ["usage: fdistill <command> [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `fdistill <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fdistill: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
