"""Read the published EDM / EDM2 checkpoints (``.pkl``) without running the code they carry.

The published files are pickles of a dict (``{"ema": network, "loss_fn": ..., "augment_pipe": ...,
"dataset_kwargs": ...}``) written with NVIDIA's ``torch_utils.persistence``: every network class is pickled as a
call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` holds the source code of the
class's Python module (a string), the class name, and the object's state (its ``__dict__``: ``_parameters``,
``_buffers``, ``_modules`` with the sub-modules, ``_init_kwargs`` with the constructor's keyword arguments).
Loading them with ``pickle.load`` would ``exec`` that source and import arbitrary globals.

``SafeUnpickler`` instead answers every global the pickle asks for from a fixed table: the persistence call becomes
a ``PersistedObject`` (class name + state; the source string is dropped unread), PyTorch containers (ModuleDict,
ModuleList, Sequential) become ``PlainModule``, tensors are rebuilt by PyTorch's tensor / parameter rebuild
functions, and their storages (embedded ``torch.save`` bytes) are read with ``torch.load(weights_only=True)``;
OrderedDict, NVIDIA's EasyDict (as dict) and numpy scalars are data. Any other global (``os.system``, ``eval``, a
class of another package, ...) stops the read with an ``UnpicklingError`` naming it. From the resulting tree the
converter reads only ``_init_kwargs`` and the tensors.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._utils

try:
    from numpy._core.multiarray import scalar as numpy_scalar           # numpy >= 2
except ImportError:                                                       # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as numpy_scalar

from .io import edm_denoiser, network_from_config, save_edm_model
from .precond import Preconditioning


class PersistedObject:
    """A ``torch_utils.persistence`` object as data: its class name and state (``__dict__``)."""

    def __init__(self, class_name: str, state: dict[str, Any] | None):
        self.class_name = class_name
        self.state = state or {}

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs")
        if not isinstance(kwargs, dict):
            raise ValueError(f"{self.class_name}: the checkpoint holds no constructor arguments (_init_kwargs)")
        return dict(kwargs)


class PlainModule:
    """A PyTorch container module (ModuleDict, ModuleList, Sequential) as data: its pickled state."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def reconstruct_persistent_obj(meta: dict[str, Any]) -> PersistedObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps class name and state, never
    looks at ``meta["module_src"]``."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a torch_utils.persistence record without type 'class' and a class name")
    return PersistedObject(meta["class_name"], meta.get("state"))


def load_storage_bytes(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes``: the embedded ``torch.save`` bytes of one storage, read with
    PyTorch's weights-only loader (tensors and storages only) onto the CPU."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): load_storage_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    **{("torch.nn.modules.container", name): PlainModule for name in CONTAINERS},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a published EDM / EDM2 checkpoint with only the globals of ``ALLOWED_GLOBALS`` (see the module
    docstring); anything else raises ``pickle.UnpicklingError`` naming it."""

    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            allowed = sorted({m for m, _ in ALLOWED_GLOBALS})
            raise pickle.UnpicklingError(f"refusing global '{module}.{name}': not part of a published EDM / EDM2 "
                                         f"checkpoint (allowed modules: {', '.join(allowed)})")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}: a published EDM / EDM2 checkpoint has none")


def read_checkpoint(path: str | Path) -> Any:
    """The published pickle at ``path`` as plain data (``PersistedObject`` / ``PlainModule`` nodes, tensors)."""
    with open(path, "rb") as file:
        try:
            return SafeUnpickler(file).load()
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"{path}: {error}") from error


def module_state(node: PersistedObject | PlainModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict (``module.state_dict()`` names) of a pickled module tree: parameters and persistent buffers of
    the node and, recursively, of its ``_modules``."""
    state = node.state
    skipped = set(state.get("_non_persistent_buffers_set", ()))
    tensors: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skipped:
                tensors[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_state(child, f"{prefix}{name}."))
    return tensors


# ------------------------------------------------------------------------------------ published class -> fdistill

EDM_PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}     # NVlabs/edm training/networks.py
EDM2_PRECOND = "Precond"                                                       # NVlabs/edm2 training/networks_edm2.py
EDM_MODELS = {"SongUNet", "DhariwalUNet"}
EDM_PRECOND_ARGS = ("use_fp16", "sigma_min", "sigma_max", "sigma_data", "model_type", "beta_d", "beta_min", "M",
                    "epsilon_t")
SAMPLING_RANGE = (0.002, 80.0)       # EDM's and EDM2's sampler, clipped to the range a network supports


def vp_sigma(t: float, beta_d: float, beta_min: float) -> float:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of the VP SDE (EDM Table 1)."""
    return float(np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t)))


def _sampling_range(kind: str, kwargs: dict[str, Any]) -> tuple[float, float]:
    if kind == "vp":
        beta_d, beta_min = kwargs.get("beta_d", 19.9), kwargs.get("beta_min", 0.1)
        supported = vp_sigma(kwargs.get("epsilon_t", 1e-5), beta_d, beta_min), vp_sigma(1.0, beta_d, beta_min)
    elif kind == "ve":
        supported = kwargs.get("sigma_min", 0.02), kwargs.get("sigma_max", 100.0)
    else:
        supported = kwargs.get("sigma_min", 0.0), kwargs.get("sigma_max", float("inf"))
    return max(SAMPLING_RANGE[0], supported[0]), min(SAMPLING_RANGE[1], supported[1])


def edm_model_config(network: PersistedObject) -> tuple[str, dict[str, Any], Preconditioning, str]:
    """(network class, its constructor arguments, preconditioning, state-dict prefix of the network) of a published
    EDM / EDM2 preconditioning object."""
    kwargs = network.init_kwargs
    if network.class_name in EDM_PRECONDS:
        kind, model_type = EDM_PRECONDS[network.class_name], kwargs.get("model_type", "DhariwalUNet")
        if model_type not in EDM_MODELS:
            raise ValueError(f"model_type {model_type!r} not supported; supported: {sorted(EDM_MODELS)}")
        args = {k: v for k, v in kwargs.items() if k not in EDM_PRECOND_ARGS and k != "img_channels"}
        args.update(in_channels=kwargs["img_channels"], out_channels=kwargs["img_channels"])
        constants = {k: kwargs[k] for k in ("sigma_data", "beta_d", "beta_min", "M") if k in kwargs}
        sigma_min, sigma_max = _sampling_range(kind, kwargs)
        return model_type, args, Preconditioning(kind, sigma_min=sigma_min, sigma_max=sigma_max, **constants), "model."
    if network.class_name == EDM2_PRECOND:
        args = {k: v for k, v in kwargs.items() if k not in ("use_fp16", "sigma_data", "logvar_channels")}
        precond = Preconditioning("edm", sigma_data=kwargs.get("sigma_data", 0.5), sigma_min=SAMPLING_RANGE[0],
                                  sigma_max=SAMPLING_RANGE[1])
        return "EDM2UNet", args, precond, "unet."
    raise ValueError(f"network class {network.class_name!r} not supported; supported: "
                     f"{sorted([*EDM_PRECONDS, EDM2_PRECOND])} (NVlabs edm / edm2)")


def convert_checkpoint(path: str | Path, out_dir: str | Path, key: str = "ema") -> Path:
    """Convert the published pickle ``path`` (its ``key`` network, "ema" in both repositories) into an fdistill EDM
    model directory ``out_dir``; EDM2's log-variance head (training only) is left out. Returns ``out_dir``."""
    data = read_checkpoint(path)
    network = data.get(key) if isinstance(data, dict) else None
    if not isinstance(network, PersistedObject):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with a persisted network under {key!r}, found {found}")
    try:
        class_name, args, precond, prefix = edm_model_config(network)
        state = {k[len(prefix):]: v for k, v in module_state(network).items() if k.startswith(prefix)}
        net = network_from_config({"_class_name": class_name, "network": args}, f"{path}")
        net.load_state_dict(state, strict=True)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())[:500]}") from error
    denoiser = edm_denoiser(net, precond)
    return save_edm_model(denoiser, out_dir, extra_config={"source": {"checkpoint": Path(path).name,
                                                                      "class_name": network.class_name}})
