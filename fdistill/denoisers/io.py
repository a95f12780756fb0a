"""Model directories: save a denoiser / one-step generator, load it (or a Diffusers model) back as a denoiser.

fdistill layout (``save_denoiser``)::

    dir/fdistill.json      {"format": 1, "wrapper": "edm" | "vp" | "flow" | "edm_network", "model_class",
                            "kind": "denoiser" | "generator",
                            "generator_sigma", "generator_sigmas", "generator_noise_scale", "sample_shape", "num_classes",
                            "conditioning", "sigma_min", "sigma_max", "feature_block", + "sigma_data" (edm),
                            + "precond" (edm_network: the EDM / EDM2 networks of ``fdistill.edm``)}
    dir/unet/              the network's ``save_pretrained`` (safetensors + config.json); plain Diffusers loads it
                           with ``<ModelClass>.from_pretrained(dir, subfolder="unet")``
    dir/scheduler/         scheduler_config.json ("vp" wrappers: prediction_type and beta schedule; "flow": the shift)
    (optional)             a whole Diffusers pipeline (model_index.json, vae/, text_encoder/, ...): text-to-image

A one-step generator is used as x = D(c z, generator_sigma), z ~ N(0, I), c = generator_noise_scale (null: c =
generator_sigma); a few-step one re-noises to each of its "generator_sigmas" in turn
(``fdistill.samplers.generator_sample``).

``load_denoiser`` also reads Diffusers pipeline directories / hub ids (model_index.json with a ``unet`` or
``transformer`` and a ``scheduler``) and bare Diffusers model directories (config.json, with scheduler_config.json
beside it or in ../scheduler), and EDM model directories (config.json of format "fdistill-edm" + model.safetensors,
``fdistill.edm.io``; ``scripts/convert_edm.py`` writes them from the published EDM / EDM2 checkpoints).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..edm.io import edm_denoiser, load_edm_denoiser, preconditioning
from ..edm.pretrained import is_edm_config
from ..edm.precond import EDMNetworkDenoiser
from .diffusers import DiffusersDenoiser
from .edm import EDMPrecond
from .model_info import ModelInfo
from .model_source import HUB_ID, MODEL_CLASSES, ModelSource  # noqa: F401 (importable from here)

FORMAT_FILE = "fdistill.json"
FORMAT_VERSION = 1
KINDS = ("denoiser", "generator")
NETWORK_DIR = "unet"
SCHEDULER_DIR = "scheduler"
PIPELINE_MODEL_COMPONENTS = ("unet", "transformer")
LORA_EXPORT_FILE = "fdistill_dpo.json"           # written by method diffusion_dpo's export
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------------- saving


def _edm_fields(denoiser: EDMPrecond) -> dict[str, Any]:
    return {"wrapper": "edm", "sigma_data": denoiser.sigma_data}


def _edm_network_fields(denoiser: EDMNetworkDenoiser) -> dict[str, Any]:
    return {"wrapper": "edm_network", "precond": denoiser.precond.as_dict()}


def _vp_fields(denoiser: DiffusersDenoiser) -> dict[str, Any]:
    return {"wrapper": _wrapper_name(denoiser), "prediction_type": denoiser.prediction_type}


def _wrapper_name(denoiser: DiffusersDenoiser) -> str:
    """"flow" for a rectified-flow model (FlowMatchEulerDiscreteScheduler), else "vp"."""
    return "flow" if denoiser.flow else "vp"


def _write_scheduler(denoiser: DiffusersDenoiser, directory: Path) -> None:
    config = {"_class_name": "DDPMScheduler", **denoiser.scheduler_config}
    directory.mkdir()
    (directory / "scheduler_config.json").write_text(json.dumps(config, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# wrapper class -> (wrapper-specific fdistill.json fields, extra files writer or None)
SAVERS: dict[type, tuple[Callable[[Any], dict], Callable[[Any, Path], None] | None]] = {
    EDMPrecond: (_edm_fields, None),
    EDMNetworkDenoiser: (_edm_network_fields, None),
    DiffusersDenoiser: (_vp_fields, lambda d, root: _write_scheduler(d, root / SCHEDULER_DIR)),
}


def _saver_for(denoiser: nn.Module):
    for cls in type(denoiser).__mro__:
        if cls in SAVERS:
            return SAVERS[cls]
    raise TypeError(f"save_denoiser: cannot save a {type(denoiser).__name__}; supported wrappers: "
                    f"{[c.__name__ for c in SAVERS]} (unwrap guidance / EMA wrappers first)")


def model_info_dict(denoiser: nn.Module, kind: str, generator_sigma: float | None,
                    generator_noise_scale: float | None = None,
                    generator_sigmas: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The fdistill.json content for ``denoiser`` (``generator_sigmas`` given: generator_sigma is its first)."""
    if generator_sigmas:
        generator_sigma = generator_sigmas[0]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "generator" and not (generator_sigma and generator_sigma > 0):
        raise ValueError(f"a generator needs generator_sigma > 0, got {generator_sigma!r}")
    fields, _ = _saver_for(denoiser)
    return {"format": FORMAT_VERSION, **fields(denoiser), "model_class": type(denoiser.net).__name__,
            "kind": kind, "generator_sigma": generator_sigma if kind == "generator" else None,
            "generator_noise_scale": generator_noise_scale if kind == "generator" else None,
            "generator_sigmas": list(generator_sigmas or [generator_sigma]) if kind == "generator" else None,
            "sample_shape": list(denoiser.sample_shape), "num_classes": denoiser.num_classes,
            "conditioning": denoiser.conditioning, "sigma_min": denoiser.sigma_min,
            "sigma_max": denoiser.sigma_max, "feature_block": denoiser.feature_block}


def save_denoiser(denoiser: nn.Module, directory: str | os.PathLike, kind: str = "denoiser",
                  generator_sigma: float | None = None, generator_noise_scale: float | None = None,
                  pipeline: Any = None, generator_sigmas: tuple[float, ...] | None = None,
                  extra_info: dict[str, Any] | None = None) -> Path:
    """Write ``denoiser`` (an EDMPrecond / MLPDenoiser or a DiffusersDenoiser) as an fdistill model directory.

    With a Diffusers ``pipeline`` (whose ``unet`` is ``denoiser.net``) the directory is that pipeline's
    ``save_pretrained`` layout plus fdistill.json: ``Pipeline.from_pretrained(directory)`` loads it, and so do
    ``load_denoiser`` / ``fdistill sample`` (with its VAE and text encoders). ``extra_info`` adds fields to
    fdistill.json (e.g. how to call the pipeline). The write is atomic: everything goes to a temporary sibling directory that is renamed into place, so a crash
    never leaves a half-written model, and an existing directory is replaced only once the new one is complete.
    Returns the directory path.
    """
    directory = Path(directory)
    info = {**model_info_dict(denoiser, kind, generator_sigma, generator_noise_scale, generator_sigmas),
            **(extra_info or {})}
    _, write_extra = _saver_for(denoiser)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if pipeline is not None:
            pipeline.save_pretrained(staging, safe_serialization=True)   # unet/ (= denoiser.net), scheduler/, ...
        else:
            denoiser.net.save_pretrained(staging / NETWORK_DIR, safe_serialization=True)
            if write_extra is not None:
                write_extra(denoiser, staging)
        (staging / FORMAT_FILE).write_text(json.dumps(info, indent=2))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_directory(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and removed afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- loading


REQUIRED_FIELDS = ("model_class", "wrapper", "kind", "generator_sigma", "feature_block")
EDM_FIELDS = ("sigma_data", "sigma_min", "sigma_max")


def _load_fdistill(source: ModelSource, meta: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    required = REQUIRED_FIELDS + (EDM_FIELDS if meta.get("wrapper") == "edm" else ())
    missing = [name for name in required if name not in meta]
    if missing:
        raise ValueError(f"{source.location(FORMAT_FILE)}: missing fields {missing} (is it an fdistill model "
                         "directory written by save_denoiser?)")
    index = source.read_json("model_index.json")
    network_dir = next((c for c in PIPELINE_MODEL_COMPONENTS if c in index), NETWORK_DIR) if index else NETWORK_DIR
    net = source.load_model(meta["model_class"], network_dir)
    if meta["wrapper"] == "edm":
        denoiser = EDMPrecond(net, sigma_data=meta["sigma_data"], dtype=dtype, feature_block=meta["feature_block"],
                              sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"])
    elif meta["wrapper"] == "edm_network":
        precond = preconditioning(meta, source.location(FORMAT_FILE))
        denoiser = edm_denoiser(net, precond, dtype=dtype, feature_block=meta["feature_block"])
    elif meta["wrapper"] in ("vp", "flow"):         # the scheduler config tells which (DiffusersDenoiser)
        scheduler = _required_json(source, SCHEDULER_DIR, "scheduler_config.json")
        denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype, feature_block=meta["feature_block"],
                                     sample_size=(meta.get("sample_shape") or [None])[-1])   # the trained size
    else:
        raise ValueError(f"{source.name}/{FORMAT_FILE}: wrapper {meta['wrapper']!r} not in "
                         "['edm', 'edm_network', 'flow', 'vp']")
    info = ModelInfo(kind=meta["kind"], generator_sigma=meta["generator_sigma"],
                     generator_noise_scale=meta.get("generator_noise_scale"), wrapper=meta["wrapper"],
                     generator_sigmas=tuple(meta["generator_sigmas"]) if meta.get("generator_sigmas") else None,
                     components=_other_components(source, index, network_dir) if index else {})
    return denoiser, info


def _required_json(source: ModelSource, *parts: str) -> dict:
    content = source.read_json(*parts)
    if content is None:
        raise FileNotFoundError(f"{source.name}: missing {source.join(*parts)}")
    return content


def _load_pipeline(source: ModelSource, index: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    component = next((c for c in PIPELINE_MODEL_COMPONENTS if c in index), None)
    if component is None:
        raise ValueError(f"{source.name}: model_index.json has none of the components {PIPELINE_MODEL_COMPONENTS}")
    net = source.load_model(index[component][1], component)
    scheduler = _required_json(source, SCHEDULER_DIR, "scheduler_config.json")
    others = _other_components(source, index, component)
    denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype)
    return denoiser, ModelInfo(wrapper=_wrapper_name(denoiser), components=others)


def _other_components(source: ModelSource, index: dict, model_component: str) -> dict[str, tuple[str, str]]:
    """The pipeline parts of model_index.json besides the model and the scheduler: name -> (root, subfolder)."""
    return {name: (source.name, source.join(name)) for name, value in index.items()
            if not name.startswith("_") and name not in (model_component, SCHEDULER_DIR) and isinstance(value, list)
            and value[0] is not None}


def _load_lora_export(source: ModelSource, meta: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    """The base pipeline named by ``meta["base_model"]`` with the export's LoRA fused into its UNet (the
    pipeline's VAE and text encoders come from the base)."""
    base = meta.get("base_model")
    if not base:
        raise ValueError(f"{source.location(LORA_EXPORT_FILE)}: the LoRA export names no base_model (trained on "
                         f"in-memory components); load its base pipeline and call pipe.load_lora_weights(...)")
    denoiser, info = load_denoiser(base, dtype=dtype)
    location = {"pretrained_model_name_or_path_or_dict": str(Path(source.name) / source.join())} if source.local \
        else {"pretrained_model_name_or_path_or_dict": source.name, "subfolder": source.subfolder}
    prefix = "transformer" if denoiser.flow else "unet"          # the pipeline's name of the network (SD3: transformer)
    denoiser.net.load_lora_adapter(**location, weight_name=LORA_WEIGHTS_FILE, prefix=prefix)
    denoiser.net.fuse_lora()        # merged into the base weights: sampling runs at the base model's speed
    denoiser.net.unload_lora()
    info.base_model = str(base)
    return denoiser, info


def _load_bare_model(source: ModelSource, config: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    scheduler = source.read_json("scheduler_config.json") or source.read_json("..", SCHEDULER_DIR,
                                                                              "scheduler_config.json")
    if scheduler is None:
        raise FileNotFoundError(f"{source.name}: a bare Diffusers model needs its scheduler: expected "
                                f"scheduler_config.json beside config.json or in ../{SCHEDULER_DIR}/")
    net = source.load_model(config.get("_class_name", "?"), None)
    denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype)
    return denoiser, ModelInfo(wrapper=_wrapper_name(denoiser))


def _load_edm_directory(source: ModelSource, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    if not source.local:
        raise ValueError(f"{source.name}: EDM model directories are read from a local path, not the hub")
    return load_edm_denoiser(Path(source.name) / source.join(), dtype=dtype), ModelInfo(wrapper="edm_network")


def load_denoiser(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load a model directory or hub id as a denoiser; returns (denoiser in eval mode, ModelInfo).

    Accepts, in this order: an fdistill directory (fdistill.json), a Diffusers pipeline (model_index.json: the
    ``unet`` or ``transformer`` plus ``scheduler``), a Diffusion-DPO LoRA export (fdistill_dpo.json naming its
    ``base_model``: the base pipeline with the LoRA fused in), an EDM / EDM2 model directory (config.json of format
    "fdistill-edm" + model.safetensors), a bare Diffusers model directory (config.json + a scheduler).
    ``subfolder`` selects a directory inside the path / repository. ``dtype`` is the network's compute dtype
    (inputs and outputs stay float32).
    Raises FileNotFoundError for a missing path, ValueError for a directory that is none of these.
    """
    source = ModelSource(path_or_hub_id, subfolder)
    if (meta := source.read_json(FORMAT_FILE)) is not None:
        denoiser, info = _load_fdistill(source, meta, dtype)
    elif (index := source.read_json("model_index.json")) is not None:
        denoiser, info = _load_pipeline(source, index, dtype)
    elif (lora := source.read_json(LORA_EXPORT_FILE)) is not None and lora.get("finetune") == "lora":
        denoiser, info = _load_lora_export(source, lora, dtype)
    elif (config := source.read_json("config.json")) is not None and is_edm_config(config):
        denoiser, info = _load_edm_directory(source, dtype)
    elif config is not None:
        denoiser, info = _load_bare_model(source, config, dtype)
    else:
        raise ValueError(f"{source.location()} is not a model directory: expected {FORMAT_FILE} (fdistill), "
                         "model_index.json (Diffusers pipeline) or config.json + scheduler_config.json "
                         "(Diffusers model)")
    denoiser = denoiser.eval().requires_grad_(False)
    if device is not None:
        denoiser = denoiser.to(device)
    info.source = str(path_or_hub_id)
    info.sample_shape = tuple(denoiser.sample_shape)
    info.num_classes, info.conditioning = denoiser.num_classes, denoiser.conditioning
    info.sigma_min, info.sigma_max = denoiser.sigma_min, denoiser.sigma_max
    return denoiser, info

