"""SHA-256 of files, read in chunks (checkpoint manifests, the Inception weights check)."""
from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 24  # bytes read at a time (16 MiB)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
