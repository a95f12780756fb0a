"""``save_pretrained`` / ``from_pretrained`` for the EDM networks: a directory with ``config.json`` (class name and
constructor arguments) and ``model.safetensors`` (the state dict), the layout Diffusers models use, so that
``fdistill.denoisers.save_denoiser`` and the model loading treat them like any other network."""
from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fdistill-edm"


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (config.json round trip)."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def is_edm_config(config: dict[str, Any]) -> bool:
    """Whether a config.json is an fdistill EDM network's."""
    return config.get("format") == FORMAT


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of an fdistill EDM model directory; FileNotFoundError / ValueError naming the file otherwise."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (an fdistill EDM model directory has {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE})")
    config = json.loads(path.read_text())
    if not is_edm_config(config):
        raise ValueError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    return config


def load_weights(net, directory: Path):
    """``net`` with the state dict of ``directory``/model.safetensors (every parameter and buffer must match)."""
    from safetensors.torch import load_file

    missing, unexpected = net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE}: does not match {type(net).__name__} of {CONFIG_FILE}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return net


class PretrainedMixin:
    """Records the constructor's keyword arguments in ``init_kwargs`` (the ``**`` catch-all flattened), and writes /
    reads a network directory from them."""

    init_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                is_catch_all = signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
                recorded.update(value if is_catch_all else {name: value})
            self.init_kwargs = _jsonable(recorded)

        cls.__init__ = recording_init

    def network_config(self) -> dict[str, Any]:
        """config.json of the network: class name, format and constructor arguments."""
        return {"_class_name": type(self).__name__, "format": FORMAT, "network": dict(self.init_kwargs)}

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True,
                        extra_config: dict[str, Any] | None = None) -> None:
        """Write config.json (+ ``extra_config`` fields) and model.safetensors into ``directory``."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("EDM networks are saved as safetensors only")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**self.network_config(), **(extra_config or {})}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None):
        """The network saved in ``directory`` (/ ``subfolder``), checked to be of this class."""
        directory = Path(directory) / (subfolder or "")
        config = read_config(directory)
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{directory}: holds a {config.get('_class_name')}, not a {cls.__name__}")
        try:
            net = cls(**config.get("network", {}))
        except TypeError as error:
            raise ValueError(f"{directory / CONFIG_FILE}: bad arguments for {cls.__name__}: {error}") from error
        return load_weights(net, directory)
