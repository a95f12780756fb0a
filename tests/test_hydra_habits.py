"""Hydra's command-line habits on ``fdistill train`` / ``distill``: --cfg, --help with defaults, -m sweeps,
hydra.run.dir (fdistill.commands.hydra_habits)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from fdistill.commands.hydra_habits import (UsageError, attribute_docs, expand_sweeps, map_hydra_override,
                                            parse_command_line)
from fdistill.training.config import TrainConfig

GMM = ["experiment=gmm_fdistill", "train.steps=2", "train.progress=false"]


def fdistill(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cfg_job_prints_the_composed_config_and_does_not_train(tmp_path):
    result = fdistill("train", "--cfg", "job", *GMM, f"train.run_dir={tmp_path}/run", "method.divergence=kl")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["steps"] == 2 and cfg["method"]["divergence"] == "kl" and "hydra" not in cfg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("part", ["hydra", "all"])
def test_cfg_hydra_shows_train_run_dir_as_hydra_run_dir(part, tmp_path):
    result = fdistill("distill", f"--cfg={part}", f"train.run_dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    hydra = cfg if part == "hydra" else cfg["hydra"]
    assert hydra["run"]["dir"] == f"{tmp_path}/run"
    assert ("train" in cfg) == (part == "all")


def test_help_lists_every_train_option_with_its_default_and_meaning():
    result = fdistill("train", "--help")
    assert result.returncode == 0
    docs = attribute_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}   # every field documented
    for f in dataclasses.fields(TrainConfig):
        assert f"train.{f.name} (" in result.stdout
    assert "train.steps (int, default: 1000)" in result.stdout
    assert "total optimisation steps" in result.stdout
    assert "experiment: " in result.stdout and "digits_teacher" in result.stdout   # the groups stay
    assert "--multirun" in result.stdout and "--cfg job|hydra|all" in result.stdout


def test_hydra_run_dir_is_train_run_dir_and_other_hydra_keys_are_refused():
    assert map_hydra_override("hydra.run.dir=out/a") == "train.run_dir=out/a"
    assert map_hydra_override("method.lr=1") == "method.lr=1"
    with pytest.raises(UsageError, match="hydra.run.dir"):
        map_hydra_override("hydra.job.chdir=true")
    with pytest.raises(UsageError, match="allowed"):
        parse_command_line(["--hydra-help"])
    with pytest.raises(UsageError, match="job, hydra, all"):
        parse_command_line(["--cfg", "jobs"])
    result = fdistill("train", "hydra/launcher=joblib")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "hydra.run.dir" in result.stderr


def test_hydra_run_dir_reaches_the_composed_config(tmp_path):
    result = fdistill("train", "--cfg", "job", *GMM, f"hydra.run.dir={tmp_path}/h")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["run_dir"] == f"{tmp_path}/h"


def test_sweeps_expand_with_hydra_grammar_last_varies_fastest():
    jobs = expand_sweeps(["experiment=gmm_fdistill", "method.divergence=rkl,kl", "train.steps=range(1,3)",
                          "train.ema_decays=[0.9,0.99]"])
    assert [job.swept for job in jobs] == [["method.divergence=rkl", "train.steps=1"],
                                           ["method.divergence=rkl", "train.steps=2"],
                                           ["method.divergence=kl", "train.steps=1"],
                                           ["method.divergence=kl", "train.steps=2"]]
    assert jobs[3].overrides[-1] == "train.ema_decays=[0.9,0.99]"     # a list is not a sweep
    assert jobs[3].dirname() == "3_method.divergence=kl,train.steps=2"


def test_multirun_runs_each_combination_in_its_dir_and_fails_if_one_fails(tmp_path):
    result = fdistill("train", "-m", *GMM, f"hydra.sweep.dir={tmp_path}/sweep", "train.lr_scheduler=constant,bogus")
    assert result.returncode == 1, result.stderr
    good = tmp_path / "sweep" / "0_train.lr_scheduler=constant"
    assert yaml.safe_load((good / "config.yaml").read_text())["train"]["lr_scheduler"] == "constant"
    assert (good / "checkpoints" / "step_000002").is_dir()
    assert not (tmp_path / "sweep" / "1_train.lr_scheduler=bogus").exists()
    table = result.stdout[result.stdout.index("#  exit"):]
    assert "0_train.lr_scheduler=constant" in table and "1/2 runs succeeded" in result.stdout
    assert [line.split()[1] for line in table.splitlines()[1:3]] == ["0", "2"]   # the exit codes


# ------------------------------------------------------------------------------------- accelerate launch's config

def launched_with(monkeypatch, **variables):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_accelerate_mixed_precision_and_accumulation_are_honoured_when_train_left_at_default(monkeypatch):
    from fdistill.config import compose

    launched_with(monkeypatch, ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4")
    spec = compose(["experiment=gmm_fdistill"])
    assert (spec.train.mixed_precision, spec.train.micro_batches) == ("bf16", 4)
    assert spec.cfg.train.mixed_precision == "bf16"        # config.yaml records what ran


def test_accelerate_no_mixed_precision_leaves_train_alone(monkeypatch):
    from fdistill.config import compose

    launched_with(monkeypatch, ACCELERATE_MIXED_PRECISION="no")   # what accelerate exports when nothing asked
    assert compose(["experiment=gmm_fdistill", "train.mixed_precision=fp16"]).train.mixed_precision == "fp16"


@pytest.mark.parametrize("variables, override, needles", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "train.mixed_precision=fp16", ["bf16", "fp16", "mixed_precision"]),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "train.mixed_precision=no", ["fp16", "train.mixed_precision=no"]),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "train.micro_batches=2", ["micro_batches=4", "micro_batches=2"]),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "train.steps=2", ["fp8", "supports"]),
])
def test_accelerate_settings_that_disagree_with_train_are_refused(monkeypatch, variables, override, needles):
    from fdistill.config import ConfigError, compose

    launched_with(monkeypatch, **variables)
    with pytest.raises(ConfigError) as error:
        compose(["experiment=gmm_fdistill", override])
    assert all(needle in str(error.value) for needle in needles), str(error.value)


def test_accelerate_conflict_from_the_command_line_exits_2_with_one_line(tmp_path):
    import os

    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = subprocess.run([sys.executable, "-m", "fdistill.cli", "train", *GMM, "train.mixed_precision=fp16",
                             f"train.run_dir={tmp_path}/run"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "ACCELERATE_MIXED_PRECISION" in result.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ shell completion

def test_completion_candidates_cover_groups_options_and_train_keys():
    from fdistill.commands.completion import candidates

    assert candidates("exp") == ["experiment="]
    assert candidates("experiment=gmm") == ["experiment=gmm_ddo", "experiment=gmm_fdistill"]
    assert candidates("train.mixed") == ["train.mixed_precision="]
    assert candidates("train.mixed_precision=") == ["train.mixed_precision=no", "train.mixed_precision=fp16",
                                                   "train.mixed_precision=bf16"]
    assert candidates("+train.export=t") == ["+train.export=true"]
    assert "train.fsdp_min_params=" in candidates("train.")          # every TrainConfig field
    assert candidates("--c") == ["--cfg"]


def test_completion_bash_script_holds_the_tables():
    result = fdistill("completion", "bash")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "complete -F _fdistill fdistill" in script
    assert '_fdistill_commands="distill train' in script and " completion" in script
    assert '[experiment]="' in script and "digits_teacher" in script.split("[experiment]=")[1].splitlines()[0]
    assert '[train.mixed_precision]="no fp16 bf16"' in script
    assert "train.micro_batches=" in script.split("_fdistill_keys=")[1].splitlines()[0]
    bad = fdistill("completion", "zsh")
    assert bad.returncode == 2 and "zsh" in bad.stderr
