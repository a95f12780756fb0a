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

import importlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..edm.io import edm_denoiser, load_edm_denoiser, preconditioning
from ..edm.pretrained import is_edm_config
from ..edm.precond import EDMNetworkDenoiser
from .diffusers import DiffusersDenoiser
from .edm import EDMPrecond

FORMAT_FILE = "fdistill.json"
FORMAT_VERSION = 1
KINDS = ("denoiser", "generator")
NETWORK_DIR = "unet"
SCHEDULER_DIR = "scheduler"
PIPELINE_MODEL_COMPONENTS = ("unet", "transformer")
LORA_EXPORT_FILE = "fdistill_dpo.json"           # written by method diffusion_dpo's export
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
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


@dataclass
class ModelInfo:
    """What a model directory says about its model.

    Attributes:
        kind: "denoiser" (multi-step sampling) or "generator" (one step: x = D(c * z, generator_sigma)).
        generator_sigma: noise level of a generator's input (None for denoisers).
        generator_sigmas: a few-step generator's noise levels sigma_1 > ... > sigma_K (sigma_1 = generator_sigma):
            x_1 = c z, x_{k+1} = D(x_k, sigma_k) + sigma_{k+1} eps_k, output D(x_K, sigma_K); None = one step.
        generator_noise_scale: c, the scale of the generator's input noise z ~ N(0, I); None = generator_sigma.
            Generators distilled from a discrete VP model use sqrt(1 + sigma^2), the "pure noise" input x_t = z of
            Diffusers pipelines (one-step DDIM at t = T - 1).
        sample_shape: shape of one sample (C, H, W) or (dim,) (latents for latent-diffusion pipelines).
        num_classes: real classes of a class-conditional model (the null class index), else None.
        conditioning: "none", "class" (labels [B]) or "text" (encoder_hidden_states).
        sigma_min, sigma_max: noise range of the model.
        wrapper: "edm", "vp" or "flow" (rectified flow: SD3, Flux).
        source: the path or hub id it was loaded from.
        base_model: a LoRA export's base pipeline (path or hub id) the LoRA was fused into; None otherwise.
        components: other pipeline parts by name -> (path or hub id, subfolder), e.g. {"vae": ("sd-dir", "vae")},
            loadable with ``<Class>.from_pretrained(root, subfolder=subfolder)``.
    """

    kind: str = "denoiser"
    generator_sigma: float | None = None
    generator_sigmas: tuple[float, ...] | None = None
    generator_noise_scale: float | None = None
    sample_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    conditioning: str = "none"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    wrapper: str = "edm"
    source: str = ""
    base_model: str | None = None
    components: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def generator_input_scale(self) -> float:
        """c of a generator's input c * z (``generator_noise_scale``, else ``generator_sigma``)."""
        return self.generator_noise_scale or self.generator_sigma

    @property
    def generator_chain(self) -> tuple[float, ...]:
        """A generator's noise levels, one per step (``generator_sigmas``, else (generator_sigma,))."""
        return tuple(self.generator_sigmas or (self.generator_sigma,))


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


class _Source:
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
            return _parse_json(path.read_text(), path) if path.is_file() else None
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
        return _parse_json(downloaded.read_text(), self.location(*parts))

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


def _parse_json(text: str, where) -> dict:
    """A JSON object, or a ValueError naming the file and the position of the syntax error."""
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(content).__name__}")
    return content


REQUIRED_FIELDS = ("model_class", "wrapper", "kind", "generator_sigma", "feature_block")
EDM_FIELDS = ("sigma_data", "sigma_min", "sigma_max")


def _load_fdistill(source: _Source, meta: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
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
        denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype, feature_block=meta["feature_block"])
    else:
        raise ValueError(f"{source.name}/{FORMAT_FILE}: wrapper {meta['wrapper']!r} not in "
                         "['edm', 'edm_network', 'flow', 'vp']")
    info = ModelInfo(kind=meta["kind"], generator_sigma=meta["generator_sigma"],
                     generator_noise_scale=meta.get("generator_noise_scale"), wrapper=meta["wrapper"],
                     generator_sigmas=tuple(meta["generator_sigmas"]) if meta.get("generator_sigmas") else None,
                     components=_other_components(source, index, network_dir) if index else {})
    return denoiser, info


def _required_json(source: _Source, *parts: str) -> dict:
    content = source.read_json(*parts)
    if content is None:
        raise FileNotFoundError(f"{source.name}: missing {source.join(*parts)}")
    return content


def _load_pipeline(source: _Source, index: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    component = next((c for c in PIPELINE_MODEL_COMPONENTS if c in index), None)
    if component is None:
        raise ValueError(f"{source.name}: model_index.json has none of the components {PIPELINE_MODEL_COMPONENTS}")
    net = source.load_model(index[component][1], component)
    scheduler = _required_json(source, SCHEDULER_DIR, "scheduler_config.json")
    others = _other_components(source, index, component)
    denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype)
    return denoiser, ModelInfo(wrapper=_wrapper_name(denoiser), components=others)


def _other_components(source: _Source, index: dict, model_component: str) -> dict[str, tuple[str, str]]:
    """The pipeline parts of model_index.json besides the model and the scheduler: name -> (root, subfolder)."""
    return {name: (source.name, source.join(name)) for name, value in index.items()
            if not name.startswith("_") and name not in (model_component, SCHEDULER_DIR) and isinstance(value, list)
            and value[0] is not None}


def _load_lora_export(source: _Source, meta: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
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


def _load_bare_model(source: _Source, config: dict, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
    scheduler = source.read_json("scheduler_config.json") or source.read_json("..", SCHEDULER_DIR,
                                                                              "scheduler_config.json")
    if scheduler is None:
        raise FileNotFoundError(f"{source.name}: a bare Diffusers model needs its scheduler: expected "
                                f"scheduler_config.json beside config.json or in ../{SCHEDULER_DIR}/")
    net = source.load_model(config.get("_class_name", "?"), None)
    denoiser = DiffusersDenoiser(net, scheduler, dtype=dtype)
    return denoiser, ModelInfo(wrapper=_wrapper_name(denoiser))


def _load_edm_directory(source: _Source, dtype: torch.dtype | None) -> tuple[nn.Module, ModelInfo]:
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
    source = _Source(path_or_hub_id, subfolder)
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

