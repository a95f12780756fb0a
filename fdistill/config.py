"""Hydra configuration of ``fdistill train``: the METHODS registry, schemas, composition and building a run.

Conventions (method engineers: follow these, they are all there is):

- Configs live in the top-level ``conf/`` (installed as the package ``fdistill.conf``), one group per folder:
  ``method/ model/ data/ sampler/ eval/ logger/ experiment/`` plus the ``train:`` section (``TrainConfig``).
  ``conf/config.yaml`` picks the defaults; ``fdistill train <overrides>`` composes it with Hydra's compose API.
- A method is a module registered in ``METHODS`` (name -> module path). The module defines a dataclass ``Config``
  (alias of ``<Name>Config``; every field documented, validated in ``__post_init__`` with a message naming the field
  and the allowed values / range) and ``build(config, model, data) -> Method``.
  Its schema is registered here as ``method/<name>_schema`` (the dataclass plus a ``name`` field), so
  ``conf/method/<name>.yaml`` starts with::

      defaults:
        - <name>_schema
        - _self_
      name: <name>

  followed only by values that differ from the dataclass's (interpolations such as ``${train.steps}``): the
  dataclass holds every default, once. Hydra rejects unknown keys; ``compose`` then builds ``Config`` once, which
  runs ``__post_init__`` (the one place a value is validated, with ``require``-style one-line messages).
- ``_target_`` only at object boundaries: ``model`` (a network / denoiser / pipeline factory; an empty model group
  gives ``model=None``), ``data`` (a factory returning a ``fdistill.data.DataSource``), ``logger`` (a ``_partial_``
  ``fdistill.training.logging.Trackers`` called with ``config``; empty = metrics.jsonl only), ``eval`` (a factory
  returning ``evaluate(generate_fn, step) -> dict[str, float]``; empty = none) and a method's ``network`` spec
  (``fdistill.networks.instantiate_network``). Targets receive plain Python values.
- ``sampler`` (``SamplerConfig``) is the multi-step sampler of sample grids. A method that samples with it declares a
  field ``sampler: SamplerConfig | None = None``; when it is null, the top-level ``sampler`` group is filled in.
- Experiments (``conf/experiment/<name>.yaml``) start with ``# @package _global_``, select groups with
  ``defaults: [{override /method: ...}, ...]`` and set any key (``train.steps``, ``method.lr``, ...).
- ``compose(overrides)`` returns the validated ``RunSpec``; ``build_run(spec)`` instantiates its objects.

Only this module and ``fdistill.commands`` import omegaconf / hydra (and ``fdistill.networks.instantiate_network``,
Hydra's ``instantiate`` for a method's ``network`` spec); library code receives dataclasses and objects.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from dataclasses import dataclass, field, make_dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .training.config import MIXED_PRECISION, SamplerConfig, TrainConfig

METHODS = {
    "denoising": "fdistill.methods.denoising",
    "fdistill": "fdistill.methods.fdistill",
    "ddo": "fdistill.methods.ddo",
    "diffusion_dpo": "fdistill.methods.diffusion_dpo",
}

GROUPS = ("method", "model", "data", "sampler", "eval", "logger", "experiment")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the allowed values."""


def config_dir() -> Path:
    """The ``conf/`` directory: ``<repo>/conf`` when this code runs from a source checkout (so an editable install
    of one checkout does not hand its configs to the code of another), else the installed package ``fdistill.conf``."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "conf"
    try:
        path = Path(str(resources.files("fdistill.conf")))
        if (path / "config.yaml").is_file():
            return path
    except ModuleNotFoundError:
        pass
    return checkout / "conf"


def method_module(name: str) -> ModuleType:
    """Import the module of method ``name`` (must define ``Config`` and ``build``)."""
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not a registered method; allowed: {sorted(METHODS)}")
    return importlib.import_module(METHODS[name])


def method_schema(name: str, config_cls: type) -> type:
    """The registered schema of a method: its Config dataclass plus a ``name`` field defaulting to the method name."""
    return make_dataclass(f"{config_cls.__name__}Schema", [("name", str, field(default=name))], bases=(config_cls,))


_REGISTERED = False


def register_schemas() -> None:
    """Put the train / sampler / method schemas in Hydra's ConfigStore (once per process). A method module that
    fails to import is left out; composing that method then reports the import error."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="train", name="base", node=TrainConfig)
    store.store(group="sampler", name="sampler_schema", node=SamplerConfig)
    for name in METHODS:
        try:
            module = method_module(name)
        except ImportError:
            continue
        store.store(group="method", name=f"{name}_schema", node=method_schema(name, module.Config))
    _REGISTERED = True


def one_line(error: BaseException) -> str:
    """An exception's message and those of its causes on one line (Hydra's messages span several, and the key and the
    expected type are often only in the cause), without Hydra's config search path listing."""
    messages = []
    while error is not None:
        messages.append(str(error).split("Config search path:")[0])
        error = error.__cause__
    return " ".join(" ".join(messages).split())


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
                   return_hydra_config: bool = False) -> DictConfig:
    """The composed DictConfig of ``conf/config.yaml`` with Hydra overrides, accelerate launch's settings applied;
    not yet validated (``compose`` validates it). Raises ConfigError with a one-line message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with one_line_errors():
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides),
                                return_hydra_config=return_hydra_config)
        apply_accelerate_launch(cfg, overrides, os.environ)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
            return_hydra_config: bool = False) -> RunSpec:
    """The validated run spec of ``conf/config.yaml`` with Hydra overrides (``experiment=digits_teacher
    train.steps=10``): every section is converted to its dataclass once, which runs its validation; raises
    ConfigError with a one-line message naming the problem. ``return_hydra_config`` keeps Hydra's own ``hydra``
    section in ``spec.cfg`` (``--cfg hydra``)."""
    cfg = compose_config(overrides, config_name, return_hydra_config)
    with one_line_errors():
        return validate(cfg)


@contextlib.contextmanager
def one_line_errors():
    """Re-raise Hydra's, OmegaConf's and the dataclasses' validation errors as ConfigError (one line)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as error:
        raise ConfigError(one_line(error)) from error


# what ``accelerate launch`` (its config file or flags) exports, and the train.* field each one means
ACCELERATE_LAUNCH_SETTINGS = {"ACCELERATE_MIXED_PRECISION": ("mixed_precision", str),
                              "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("micro_batches", int)}


def apply_accelerate_launch(cfg: DictConfig, overrides, environ) -> None:
    """Honour ``accelerate launch``'s mixed precision and gradient accumulation (its config file's
    ``mixed_precision: bf16``, ``--gradient_accumulation_steps``), exported as ``ACCELERATE_*`` variables.

    The trainer applies ``train.mixed_precision`` / ``train.micro_batches`` itself, so accelerate's values are
    copied into ``cfg.train`` when train.* was left at its ``TrainConfig`` default (not set by an experiment or on
    the command line); a differing explicit value raises ConfigError naming both. Accelerate exports
    mixed precision 'no' when nothing asked for it, so 'no' never overrides train.*.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for variable, (name, kind) in ACCELERATE_LAUNCH_SETTINGS.items():
        wanted = environ.get(variable, "")
        if wanted in ("", "no"):
            continue
        try:
            wanted = kind(wanted)
        except ValueError:
            raise ConfigError(f"{variable}={wanted!r} (from accelerate launch) is not a valid train.{name}") from None
        if name == "mixed_precision" and wanted not in MIXED_PRECISION:
            raise ConfigError(f"accelerate launch asks mixed_precision={wanted} ({variable}); fdistill supports "
                              f"{MIXED_PRECISION}")
        current = cfg.train[name]
        if current == wanted:
            continue
        explicit = any(str(o).split("=", 1)[0].lstrip("+~") == f"train.{name}" for o in overrides)
        if explicit or current != defaults[name]:
            raise ConfigError(f"accelerate launch asks {name}={wanted} ({variable}) but train.{name}={current}; make "
                              f"them agree (set train.{name}={wanted} or change the accelerate config)")
        cfg.train[name] = wanted


@dataclass
class RunSpec:
    """A composed, validated configuration, split into the parts the trainer and the method need."""

    cfg: DictConfig
    train: TrainConfig
    method_name: str
    method_config: Any
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def to_method_config(node: DictConfig, sampler: SamplerConfig) -> tuple[str, Any]:
    """(method name, the module's ``Config`` instance) of the ``method`` section; its ``__post_init__`` (the
    method's validation) runs once, here. A null ``sampler`` field is filled with the top-level sampler."""
    values = OmegaConf.to_container(node, resolve=True)
    name = values.pop("name")
    if "sampler" in values and values["sampler"] is None:
        values["sampler"] = sampler
    return name, method_module(name).Config(**values)


def reject_unknown_keys(section: str, node: DictConfig, allowed: set[str]) -> None:
    """Hydra's ``+key=value`` appends even to schema'd sections; a key no dataclass field reads is a typo."""
    unknown = sorted(set(node.keys()) - allowed)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a known key of {section}; allowed: {sorted(allowed)}")


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def validate(cfg: DictConfig) -> RunSpec:
    """Convert the schema'd sections of a composed config to their dataclasses (running each one's validation,
    once) and return them; ``compose`` calls this. Raises ValueError / OmegaConf errors naming the key."""
    reject_unknown_keys("train", cfg.train, field_names(TrainConfig))
    reject_unknown_keys("sampler", cfg.sampler, field_names(SamplerConfig))
    reject_unknown_keys("method", cfg.method, field_names(method_module(cfg.method.get("name")).Config) | {"name"})
    train = OmegaConf.to_object(cfg.train)
    sampler = OmegaConf.to_object(cfg.sampler)
    name, method_config = to_method_config(cfg.method, sampler)
    if hasattr(method_config, "check_train"):  # settings of a method that constrain the train section (DDO rounds)
        method_config.check_train(train)
    return RunSpec(cfg, train, name, method_config, sampler)


def instantiate_optional(node: DictConfig | None, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with plain-Python arguments; an empty or missing node gives None."""
    from hydra.utils import instantiate

    if node is None or len(node) == 0:
        return None
    return instantiate(node, _convert_="all", **kwargs)


@dataclass
class Run:
    """Everything ``fdistill train`` needs: the spec and the built objects."""

    spec: RunSpec
    data: Any
    model: Any
    method: Any
    evaluator: Any
    trackers: Any = None


def build_run(spec: RunSpec, with_loggers: bool = True) -> Run:
    """Build data, model, method (seeded by ``train.seed`` so initial weights are reproducible), evaluator and
    trackers from a validated spec. Bad data / model / method settings raise ConfigError with a one-line message."""
    from .training.trainer import seed_all

    from hydra.errors import InstantiationException

    cfg = spec.cfg
    seed_all(spec.train.seed)
    try:
        data = instantiate_optional(cfg.data)
        if data is None:
            raise ConfigError("the data group is empty; choose one with data=<name>")
        model = instantiate_optional(cfg.get("model"))
        method = method_module(spec.method_name).build(spec.method_config, model, data)
        factory = instantiate_optional(cfg.get("logger")) if with_loggers else None
        trackers = factory(config=OmegaConf.to_container(cfg, resolve=True)) if factory is not None else None
    except (InstantiationException, ValueError, FileNotFoundError) as error:
        # bad data / model / method settings (a missing file, a wrong option of a data source, data that do not
        # fit the model) reach the user as one line naming the problem, not as a traceback
        raise ConfigError(error if isinstance(error, ConfigError) else one_line(error)) from error
    evaluator = instantiate_optional(cfg.get("eval"))
    return Run(spec, data, model, method, evaluator, trackers)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """The resolved config as YAML (``run_dir/config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), path)
