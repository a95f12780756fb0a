"""``fdistill push RUN_DIR --repo-id OWNER/NAME``: upload a run's export (``RUN_DIR/model``) to the Hugging Face Hub.

    fdistill push runs/sd15_fdistill --repo-id me/sd15-one-step
    fdistill push runs/dpo --repo-id me/sd15-dpo-lora --private

Creates the model repository if it does not exist and uploads every file of the export, model card (README.md)
included; an export written before model cards existed gets its card first. The token is ``--token``, else
huggingface_hub's own (``HF_TOKEN``, ``hf auth login``). ``train.push_to_hub=true train.hub_repo_id=...`` does the
same at the end of ``fdistill train``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdistill.denoisers.io import HUB_ID
from fdistill.training.hub import CARD_FILENAME, HubPushError, push_export, write_model_card


def repo_id(value: str) -> str:
    if not HUB_ID.match(value):
        raise argparse.ArgumentTypeError(f"expected a Hub repository id OWNER/NAME, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdistill push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding model/ (the export)")
    parser.add_argument("--repo-id", type=repo_id, required=True, help="the Hub model repository OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    model_dir = args.run_dir / "model"
    if not model_dir.is_dir():
        print(f"fdistill push: {model_dir}: no such directory (is {args.run_dir} a finished run with "
              f"train.export=true?)", file=sys.stderr)
        return 2
    if not (model_dir / CARD_FILENAME).is_file():
        write_model_card(model_dir, args.run_dir, argv=[])
    try:
        url = push_export(model_dir, args.repo_id, private=args.private, token=args.token)
    except HubPushError as error:
        print(f"fdistill push: {error}", file=sys.stderr)
        return 1
    print(url)
    return 0
