"""Checkpoint manifests: ``manifest.json`` lists every file of a checkpoint with its size and SHA-256, and the
run-defining settings of the run that wrote it (see ``resume.py``). It is written last, so a checkpoint directory
with a manifest whose files all match it is complete and undamaged: ``verify_files`` is how resume tells an intact
checkpoint from a truncated, corrupted or partly deleted one.

Format (JSON)::

    {"format": 1, "step": 8,
     "files": {"model.safetensors": {"bytes": 1234, "sha256": "<hex>"}, ...},
     "config": {"method.lr": 0.002, ...}, "config_sha256": "<hex>"}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..hashing import file_sha256

MANIFEST = "manifest.json"
FORMAT = 1


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of settings as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, step: int, config: dict[str, Any] | None) -> None:
    """Hash every file in ``directory`` and write ``manifest.json`` there (via a temporary file, fsync'ed, renamed:
    the manifest itself is never half written)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {"format": FORMAT, "step": step, "files": files, "config": config,
                "config_sha256": None if config is None else config_sha256(config)}
    temporary = directory / f".{MANIFEST}.tmp"
    with temporary.open("w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory; ValueError naming the problem when it is missing or unreadable."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} has no file list")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> str | None:
    """None when every file the manifest lists exists with its size and SHA-256; else what is wrong (one file)."""
    for name, expected in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest {expected['bytes']} (truncated or overwritten)"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted)"
    return None
