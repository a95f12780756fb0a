"""Prompt files for text-to-image sampling and evaluation, and the caption index written beside sampled images.

A prompt file is read by its extension:

    .txt      one prompt per line (blank lines are skipped; a prompt cannot span lines)
    .json     a list of strings, or a list of objects holding ``caption_column`` (COCO-style ``{"caption": ...}``)
    .jsonl    one such string or object per line (``captions.jsonl`` written by ``fdistill sample``)
    .parquet  the column ``caption_column`` (strings)

``fdistill sample`` writes ``captions.jsonl`` next to its images: one ``{"file": "000000.png", "caption": ...}`` per
image, so ``fdistill clipscore --images DIR`` finds each image's prompt by file name.
"""
from __future__ import annotations

import json
from pathlib import Path

PROMPT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
DEFAULT_CAPTION_COLUMN = "caption"
CAPTIONS_FILENAME = "captions.jsonl"


def _caption(entry, path: Path, position: int, column: str) -> str:
    """The prompt of one json entry: a string, or an object's ``column`` string."""
    value = entry.get(column) if isinstance(entry, dict) else entry
    if not isinstance(value, str):
        raise ValueError(f"{path}: entry {position} is not a string or an object with a string {column!r} field "
                         f"(got {type(entry).__name__}); pick the field with --caption-column")
    return value


def read_prompts(path: str | Path, caption_column: str = DEFAULT_CAPTION_COLUMN) -> list[str]:
    """The prompts of a prompt file (see the module docstring), in file order. Errors name the file and the
    problem: missing file, unknown extension, missing column, non-string entry, no prompt at all."""
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"{path}: unknown prompt file type {path.suffix!r}; allowed: {', '.join(PROMPT_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if caption_column not in table.column_names:
            raise ValueError(f"{path}: no column {caption_column!r} (columns: {', '.join(table.column_names)}); "
                             "pick one with --caption-column")
        prompts = [_caption(value, path, i, caption_column)
                   for i, value in enumerate(table.column(caption_column).to_pylist())]
    else:
        try:
            if path.suffix == ".json":
                entries = json.loads(path.read_text(encoding="utf-8"))
            else:
                entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(entries, list):
            raise ValueError(f"{path}: a .json prompt file holds a list of strings or objects, got "
                             f"{type(entries).__name__}")
        prompts = [_caption(entry, path, i, caption_column) for i, entry in enumerate(entries)]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def read_image_captions(folder: str | Path, files: list[Path]) -> list[str]:
    """The caption of each of ``files`` from ``folder/captions.jsonl`` (written by ``fdistill sample``); an image
    missing from it is an error naming the file."""
    folder = Path(folder)
    index_path = folder / CAPTIONS_FILENAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist; give the prompts with --prompts")
    captions = {}
    for line in index_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            captions[entry["file"]] = entry[DEFAULT_CAPTION_COLUMN]
    names = [f.relative_to(folder).as_posix() for f in files]
    missing = [name for name in names if name not in captions]
    if missing:
        raise ValueError(f"{index_path}: no caption for {len(missing)} image(s), e.g. {missing[0]}")
    return [captions[name] for name in names]
