"""fdistill EDM model directories::

    dir/config.json        {"_class_name": "SongUNet" | "DhariwalUNet" | "EDM2UNet", "format": "fdistill-edm",
                            "network": {constructor arguments}, "precond": {Preconditioning fields}, "source": ...}
    dir/model.safetensors  the network's state dict (parameter names as the published EDM / EDM2 checkpoints)

``scripts/convert_edm.py`` writes them from the published pickles; ``edm_model_from_config`` builds one with random
weights; ``fdistill.denoisers.load_denoiser`` loads them (``load_edm_denoiser``) like any other model directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adm import DhariwalUNet
from .edm2 import EDM2UNet
from .precond import EDMNetworkDenoiser, Preconditioning
from .pretrained import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_weights, read_config
from .songunet import SongUNet

NETWORK_CLASSES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet,
                                               "EDM2UNet": EDM2UNet}


def network_from_config(config: dict[str, Any], where: str = "config") -> nn.Module:
    """The network named by ``config["_class_name"]`` built from ``config["network"]`` (random weights)."""
    class_name = config.get("_class_name")
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f"{where}: network class {class_name!r} not supported; supported: {sorted(NETWORK_CLASSES)}")
    try:
        return NETWORK_CLASSES[class_name](**config.get("network", {}))
    except TypeError as error:
        raise ValueError(f"{where}: bad arguments for {class_name}: {error}") from error


def load_network(directory: str | os.PathLike) -> nn.Module:
    """The network of an EDM model directory with its weights (every parameter and buffer must be present)."""
    directory = Path(directory)
    config = read_config(directory)
    return load_weights(network_from_config(config, str(directory / CONFIG_FILE)), directory)


def preconditioning(config: dict[str, Any], where: str) -> Preconditioning:
    """The ``Preconditioning`` of a config's / fdistill.json's "precond" object."""
    fields = config.get("precond")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: missing the 'precond' object (kind 'edm' | 'vp' | 've' and its constants)")
    try:
        return Preconditioning(**fields)
    except TypeError as error:
        raise ValueError(f"{where}: bad 'precond' fields: {error}") from error


def edm_denoiser(net: nn.Module, precond: Preconditioning, dtype: torch.dtype | None = None,
                 feature_block: str | None = None) -> EDMNetworkDenoiser:
    return EDMNetworkDenoiser(net, precond, label_dim=net.init_kwargs.get("label_dim", 0), dtype=dtype,
                              feature_block=feature_block)


def load_edm_denoiser(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> EDMNetworkDenoiser:
    """An EDM model directory (config.json with "precond" + model.safetensors) as a denoiser."""
    directory = Path(directory)
    precond = preconditioning(read_config(directory), str(directory / CONFIG_FILE))
    return edm_denoiser(load_network(directory), precond, dtype=dtype)


def save_edm_model(denoiser: EDMNetworkDenoiser, directory: str | os.PathLike,
                   extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``denoiser`` as an EDM model directory (``extra_config``: e.g. the checkpoint it was converted from)."""
    directory = Path(directory)
    denoiser.net.save_pretrained(directory, extra_config={"precond": denoiser.precond.as_dict(),
                                                          **(extra_config or {})})
    return directory


def edm_model_from_config(class_name: str, network: dict[str, Any], precond: dict[str, Any] | None = None,
                          seed: int = 0) -> EDMNetworkDenoiser:
    """A denoiser of the given architecture with random weights (``precond`` fields; default EDM's)."""
    torch.manual_seed(seed)
    net = network_from_config({"_class_name": class_name, "network": network}, class_name)
    return edm_denoiser(net, Preconditioning(**(precond or {})))
