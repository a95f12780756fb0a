"""Hydra configuration: every experiment composes and validates; bad keys / values fail naming the key and the
allowed values; the CLI turns config errors into one line and exit code 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fdistill.config import METHODS, ConfigError, compose, config_dir
from fdistill.commands.train import main as train_main
from fdistill.training.config import TrainConfig

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    rounds = ["method.rounds=2", "method.steps_per_round=1"] if experiment.endswith("_ddo") else []  # = train.steps
    spec = compose([f"experiment={experiment}", "train.steps=2", "train.batch_size=4", "train.micro_batches=1",
                             *rounds])
    assert spec.method_name in METHODS
    assert spec.train.steps == 2 and spec.train.batch_size == 4
    assert type(spec.method_config).__name__.endswith("Config")


def test_digits_teacher_settings_reach_the_dataclasses():
    spec = compose(["experiment=digits_teacher", "method.lr=3e-4", "sampler.steps=7"])
    assert spec.method_name == "denoising"
    assert spec.method_config.lr == pytest.approx(3e-4)
    assert spec.method_config.label_dropout == pytest.approx(0.1)
    assert spec.method_config.sampler.steps == 7 and spec.method_config.sampler.solver == "dpmpp_2m"
    assert spec.train.ema_decays == [0.999]


@pytest.mark.parametrize("override, needles", [
    ("method.lr=-1", ["method.lr", "> 0"]),
    ("method.weighting=banana", ["method.weighting", "edm", "epsilon", "v_prediction"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16", "fp16"]),
    ("train.steps=0", ["train.steps", ">= 1"]),
    ("sampler.schedule=cosine", ["sampler.schedule", "karras", "logsnr"]),
    ("method.no_such_key=1", ["no_such_key"]),
    ("method=banana", ["method/banana", "denoising"]),
])
def test_bad_values_name_the_key_and_allowed_values(override, needles):
    with pytest.raises(ConfigError) as info:
        compose(["experiment=digits_teacher", override])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_train_cli_config_error_is_one_line_and_exit_2(capsys):
    assert train_main(["experiment=digits_teacher", "method.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method.lr" in err


def test_batch_not_divisible_by_micro_batches_is_rejected():
    with pytest.raises(ValueError, match="train.micro_batches"):
        TrainConfig(batch_size=10, micro_batches=4)


@pytest.mark.parametrize("override, needles", [
    ("+method.no_such_key=1", ["method.no_such_key", "allowed", "label_dropout"]),   # '+' appends past the schema
    ("+train.stepz=3", ["train.stepz", "allowed", "steps"]),
    ("+sampler.order=2", ["sampler.order", "allowed", "solver"]),
    ("train.steps=abc", ["train.steps", "Integer"]),                               # the type, from Hydra's cause
    ("experiment=banana", ["experiment/banana", "digits_teacher"]),
])
def test_appended_keys_and_wrong_types_name_the_key(override, needles):
    with pytest.raises(ConfigError) as info:
        compose(["experiment=digits_teacher", override])
    message = str(info.value)
    assert "\n" not in message and "Config search path" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_fdistill_train_subprocess_exits_2_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "fdistill.cli", "train", "train.mixed_precision=fp8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train.mixed_precision" in lines[0] and "'bf16'" in lines[0]


def test_compose_returns_the_run_spec_validating_each_section_once(monkeypatch):
    """compose() converts train, sampler and method to their dataclasses exactly once: their __post_init__ (the one
    place a value is validated) runs once per section."""
    from fdistill.methods.denoising import DenoisingConfig
    from fdistill.samplers.config import SamplerConfig

    calls = {}
    for cls in (TrainConfig, SamplerConfig, DenoisingConfig):
        def counting(self, original=cls.__post_init__, name=cls.__name__):
            calls[name] = calls.get(name, 0) + 1
            original(self)
        monkeypatch.setattr(cls, "__post_init__", counting)
    spec = compose(["experiment=digits_teacher"])
    assert isinstance(spec.method_config, DenoisingConfig) and spec.cfg.method.name == "denoising"
    assert calls == {"TrainConfig": 1, "SamplerConfig": 1, "DenoisingConfig": 1}


def dataclass_defaults(cls) -> dict:
    import dataclasses

    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(config_dir())) for p in [
    *(config_dir() / "method").glob("*.yaml"), *(config_dir() / "sampler").glob("*.yaml"), config_dir() / "config.yaml"]))
def test_yaml_files_do_not_restate_a_dataclass_default(path):
    """One source for each default: a method / sampler / train value written in YAML differs from the dataclass's."""
    from omegaconf import OmegaConf

    from fdistill.config import method_module
    from fdistill.samplers.config import SamplerConfig

    node = OmegaConf.to_container(OmegaConf.load(config_dir() / path))
    group = path.split("/")[0]
    if group == "method":
        sections = {None: method_module(node["name"]).Config}
    elif group == "sampler":
        sections = {None: SamplerConfig}
    else:                                     # config.yaml: its train: section
        sections = {"train": TrainConfig}
    for key, cls in sections.items():
        values = node if key is None else node.get(key, {})
        defaults = dataclass_defaults(cls)
        restated = sorted(k for k, v in values.items() if k in defaults and v == defaults[k]
                          or k in defaults and isinstance(v, list) and list(defaults[k] or []) == v)
        assert not restated, f"{path} restates the defaults of {cls.__name__}: {restated}"
