"""Where a model directory is read from: a local directory or a Hugging Face hub repository, file by file
(``fdistill.denoisers.io.load_denoiser`` reads its layouts through ``ModelSource``)."""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

from torch import nn

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# model_class name in a config / fdistill.json -> module that defines it.
MODEL_CLASSES = {
    "UNet2DModel": "diffusers",
    "UNet2DConditionModel": "diffusers",
    "DiTTransformer2DModel": "diffusers",
    "SD3Transformer2DModel": "diffusers",
    "FluxTransformer2DModel": "diffusers",
    "MLPNetwork": "fdistill.networks",
    "SongUNet": "fdistill.edm",
    "DhariwalUNet": "fdistill.edm",
    "EDM2UNet": "fdistill.edm",
}


class ModelSource:
    """A local directory or a Hugging Face hub repository, read file by file (hub files are fetched on demand)."""

    def __init__(self, path_or_hub_id: str | os.PathLike, subfolder: str | None):
        self.name = str(path_or_hub_id)
        self.local = Path(path_or_hub_id).exists()
        if not self.local and (os.path.isabs(self.name) or not HUB_ID.match(self.name)):
            raise FileNotFoundError(f"model path {self.name!r} does not exist (and is not a hub id 'owner/name')")
        self.subfolder = subfolder

    def join(self, *parts: str) -> str:
        """Path (local) or subfolder (hub) of ``parts`` under the source's subfolder."""
        parts = tuple(p for p in (self.subfolder, *parts) if p)
        return "/".join(parts)

    def read_json(self, *parts: str) -> dict | None:
        """The JSON file at ``parts`` or None when it does not exist."""
        relative = self.join(*parts)
        if self.local:
            path = Path(self.name) / relative
            return parse_json(path.read_text(), path) if path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        try:
            downloaded = Path(hf_hub_download(self.name, relative))
        except Exception as error:
            if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
                return None              # the repository exists and lacks this file: try the next layout
            # offline (LocalEntryNotFoundError), unknown repo, gated...: say which source failed
            raise FileNotFoundError(f"model {self.name!r} is not a local path and could not be read from the "
                                    f"Hugging Face hub: {error}") from error
        return parse_json(downloaded.read_text(), self.location(*parts))

    def location(self, *parts: str) -> str:
        """A readable name of ``parts`` inside the source, for error messages."""
        relative = self.join(*parts)
        return str(Path(self.name) / relative) if self.local else ":".join(filter(None, (self.name, relative)))

    def load_model(self, class_name: str, component: str | None) -> nn.Module:
        if class_name not in MODEL_CLASSES:
            raise ValueError(f"{self.name}: model class {class_name!r} not supported; allowed: {sorted(MODEL_CLASSES)}")
        cls = getattr(importlib.import_module(MODEL_CLASSES[class_name]), class_name)
        if self.local:
            return cls.from_pretrained(Path(self.name) / self.join(component or ""))
        return cls.from_pretrained(self.name, subfolder=self.join(component or "") or None)


def parse_json(text: str, where) -> dict:
    """A JSON object, or a ValueError naming the file and the position of the syntax error."""
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(content).__name__}")
    return content
