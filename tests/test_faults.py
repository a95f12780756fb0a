"""Fault injection on the training side: each fault is survived with nothing lost (the run resumes to the bitwise
weights of an uninterrupted run, every metrics row once) or refused with one line naming the cause.

Faults: a kill at each phase of a checkpoint write and of rotation (an exception no handler catches stands in for
SIGKILL at that point; tests/test_trainer.py kills real processes); each checkpoint file corrupted (finite garbage),
truncated or deleted; all checkpoints damaged; partial checkpoint directories; a second run into a live run's
directory; a dead run's stale lock; resuming with changed run-defining settings; a full disk (ENOSPC); a kill after
the final checkpoint; NaN with keep_last=1.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdistill.commands.train import main as train_main
from fdistill.data import gaussian_mixture
from fdistill.training import (CheckpointError, NonFiniteLossError, ResumeConflict, RunDirLocked, Trainer, TrainConfig,
                               list_checkpoints)
from fdistill.training import checkpoint as checkpoint_module

from factories import probe_method, tiny_denoising_method
from test_trainer import TINY_RING

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

KILL_STEP = 3
RUN = {"steps": 4, "batch_size": 8, "device": "cpu", "progress": False, "log_every": 1, "checkpoint_every": 1,
       "keep_last": 1, "ema_decays": [0.9], "export": False}


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` / ``except OSError`` handler runs for it."""


def trainer(run_dir: Path, method=None, **overrides) -> Trainer:
    config = TrainConfig(**{**RUN, "run_dir": str(run_dir), **overrides})
    return Trainer(method or tiny_denoising_method(), gaussian_mixture(preset="ring8", num_samples=64), config)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    """Trained and EMA weights (what a checkpoint holds besides the trainer state)."""
    ema = {f"ema.{k}": v for k, v in t.ema.state_dict(0.9).items()}
    return {k: v.detach().clone() for k, v in {**t.method.checkpoint_state_dict(), **ema}.items()}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_dir_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture
def finished_run(tmp_path_factory):
    """(run_dir, weights) of an uninterrupted 4-step run; checkpoints step_000003 and step_000004 remain (keep_last=1
    plus the last checkpoint whose next step was finite). Per test: the thread count (conftest) must be the same."""
    run_dir = tmp_path_factory.mktemp("reference")
    reference = trainer(run_dir)
    reference.fit()
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [3, 4]
    return run_dir, weights(reference)


def resume_and_check(run_dir: Path, expected: dict, capsys, resumed_from: int) -> str:
    """Rerun into ``run_dir``: it must resume from step ``resumed_from`` and end with the uninterrupted weights,
    each metrics row once and no leftovers; returns what it printed."""
    capsys.readouterr()
    resumed = trainer(run_dir)
    resumed.fit()
    err = capsys.readouterr().err
    checkpoint = run_dir / "checkpoints" / f"step_{resumed_from:06d}"
    assert f"resuming from step {resumed_from} (checkpoint {checkpoint})" in err
    assert_bitwise_equal(weights(resumed), expected)
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    kept = [name for name in checkpoint_dir_entries(run_dir) if not name.startswith("damaged-")]
    assert kept == ["step_000003", "step_000004"]
    return err


# ------------------------------------------------------------------------------------------------ kills mid-write
def kill_when(original, t: Trainer, condition=lambda *args: True):
    """``original`` that dies (Killed) when called during the checkpoint write of step KILL_STEP and condition holds."""
    def wrapper(*args, **kwargs):
        if t.step == KILL_STEP and condition(*args):
            raise Killed
        return original(*args, **kwargs)
    return wrapper


def kill_mid_deletion(t: Trainer):
    """shutil.rmtree that deletes one file of a checkpoint being rotated away, then dies."""
    original = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if t.step == KILL_STEP and Path(path).name.startswith(".trash-"):
            next(Path(path).iterdir()).unlink()
            raise Killed
        return original(path, *args, **kwargs)
    return rmtree


PHASES = {  # phase of the checkpoint write of step 3 -> (where to kill, the step a rerun resumes from)
    "model file": (lambda t: (checkpoint_module, "save_file", kill_when(
        checkpoint_module.save_file, t, lambda tensors, path: path.name == "model.safetensors")), 2),
    "EMA file": (lambda t: (checkpoint_module, "save_file", kill_when(
        checkpoint_module.save_file, t, lambda tensors, path: path.name.startswith("ema_"))), 2),
    "trainer state": (lambda t: (torch, "save", kill_when(torch.save, t)), 2),
    "manifest": (lambda t: (checkpoint_module, "write_manifest", kill_when(checkpoint_module.write_manifest, t)), 2),
    "rename into place": (lambda t: (os, "rename", kill_when(
        os.rename, t, lambda source, target: Path(source).name.startswith(".tmp-"))), 2),
    "rotation: rename to trash": (lambda t: (os, "rename", kill_when(
        os.rename, t, lambda source, target: Path(target).name.startswith(".trash-"))), 3),
    "rotation: mid-deletion": (lambda t: (shutil, "rmtree", kill_mid_deletion(t)), 3),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_at_each_phase_of_a_checkpoint_write_and_of_rotation(phase, tmp_path, monkeypatch, capsys, finished_run):
    patch, resumed_from = PHASES[phase]
    killed = trainer(tmp_path)
    monkeypatch.setattr(*patch(killed))
    with pytest.raises(Killed):
        killed.fit()
    monkeypatch.undo()
    resume_and_check(tmp_path, finished_run[1], capsys, resumed_from)


# ------------------------------------------------------------------------------------------------ damaged files
def corrupt(path: Path) -> None:
    """Flip the lowest bit of each of the last 4 bytes: same size, and in a weight file a finite wrong value."""
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 1 for b in data[-4:])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = {"corrupt": corrupt, "truncate": truncate, "delete": Path.unlink}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("name", ["model.safetensors", "ema_0.9.safetensors", "trainer_state.pt", "manifest.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(name, damage, tmp_path, capsys, finished_run):
    reference_dir, expected = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    DAMAGES[damage](run_dir / "checkpoints" / "step_000004" / name)
    err = resume_and_check(run_dir, expected, capsys, resumed_from=3)
    damaged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith("fdistill: checkpoint step_000004 is damaged (") and name in damaged[0]
    assert damaged[0].endswith("moved to damaged-step_000004; resuming from the newest intact checkpoint, step_000003")
    assert (run_dir / "checkpoints" / "damaged-step_000004").is_dir()             # kept for inspection


def test_no_intact_checkpoint_refuses_naming_them_unless_resume_never(tmp_path, capsys, finished_run):
    reference_dir, expected = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    corrupt(run_dir / "checkpoints" / "step_000003" / "model.safetensors")
    truncate(run_dir / "checkpoints" / "step_000004" / "trainer_state.pt")
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as refused:
        trainer(run_dir).fit()
    message = str(refused.value)
    assert "\n" not in message
    assert "step_000004: trainer_state.pt has" in message and "step_000003: model.safetensors does not match" in message
    assert "train.resume=never" in message
    assert checkpoint_dir_entries(run_dir) == ["step_000003", "step_000004"]       # nothing deleted or moved
    assert (run_dir / "metrics.jsonl").read_text() == metrics                      # history untouched

    fresh = trainer(run_dir, resume="never")                                        # knowingly start over
    fresh.fit()
    assert_bitwise_equal(weights(fresh), expected)
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def test_partial_checkpoint_directories_are_removed_on_start(tmp_path, capsys):
    trainer(tmp_path, steps=2).fit()
    root = tmp_path / "checkpoints"
    partial = root / "step_000005"                                   # no manifest, no trainer state: cut short
    partial.mkdir()
    shutil.copy(root / "step_000002" / "model.safetensors", partial)
    trash = root / ".trash-step_000001-123"                                         # a deletion cut short
    trash.mkdir()
    (trash / "model.safetensors").write_bytes(b"x")
    capsys.readouterr()
    resumed = trainer(tmp_path, steps=3)
    resumed.fit()
    err = capsys.readouterr().err
    assert f"removed incomplete checkpoint {partial}" in err and "resuming from step 2" in err
    assert resumed.step == 3
    assert checkpoint_dir_entries(tmp_path) == ["step_000002", "step_000003"]


# ------------------------------------------------------------------------------------------------ write failures
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_the_previous_one_resumes(tmp_path, monkeypatch, capsys,
                                                                                     finished_run):
    failing = trainer(tmp_path)
    original = checkpoint_module.save_file

    def disk_full(tensors, path):
        if failing.step == KILL_STEP:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(CheckpointError) as failed:
        failing.fit()
    message = str(failed.value)
    assert "\n" not in message
    assert f"cannot write checkpoint step_000003 in {tmp_path / 'checkpoints'}: [Errno {errno.ENOSPC}]" in message
    assert f"the previous checkpoint ({tmp_path / 'checkpoints' / 'step_000002'}) is intact" in message
    assert checkpoint_dir_entries(tmp_path) == ["step_000001", "step_000002"]       # temporary removed
    monkeypatch.undo()
    resume_and_check(tmp_path, finished_run[1], capsys, resumed_from=2)


def test_cli_disk_full_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    def disk_full(tensors, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    assert train_main([*TINY_RING, "train.steps=1", f"train.run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fdistill train: cannot write checkpoint step_000001 in")


# ------------------------------------------------------------------------------------------------ NaN
def test_nan_stop_keeps_and_names_the_last_checkpoint_whose_next_step_was_finite(tmp_path):
    method = probe_method(nan_at=4)                                   # steps 0-3 finite, step 4 (from step_000004) NaN
    with pytest.raises(NonFiniteLossError, match=r"whose next step was finite: \S*step_000003$"):
        trainer(tmp_path, method, steps=10, ema_decays=[]).fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]   # keep_last=1 kept step 3


# ------------------------------------------------------------------------------------------------ concurrent runs
def subprocess_env() -> dict[str, str]:
    """This checkout first on the path (the helper imports fdistill as this test process does)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (until its stdin closes)."""
    holder = subprocess.Popen([sys.executable, str(TESTS / "trainer_helpers.py"), "lock", str(run_dir)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_into_a_locked_run_dir_exits_2_naming_the_holder(tmp_path, capsys):
    common = [*TINY_RING, "train.steps=1", f"train.run_dir={tmp_path}"]
    holder = hold_lock(tmp_path)
    try:
        assert train_main(common) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        assert f"run_dir {tmp_path} is in use by pid {holder.pid} on host {socket.gethostname()}" in err
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert train_main(common) == 0                                    # free again once the holder is done

    first = trainer(tmp_path / "in_process")                          # the same within one process
    first.open_run()
    with pytest.raises(RunDirLocked, match=f"in use by pid {os.getpid()}"):
        trainer(tmp_path / "in_process").fit()
    first.release_lock()


def test_stale_lock_of_a_killed_run_is_taken_over_saying_so(tmp_path, capsys):
    holder = hold_lock(tmp_path)
    holder.kill()                                                     # SIGKILL: its lock file still names it
    assert holder.wait(timeout=60) == -signal.SIGKILL
    lock_file = tmp_path / "run.lock"
    assert lock_file.read_text().split() == [socket.gethostname(), str(holder.pid)]
    capsys.readouterr()
    trainer(tmp_path, steps=1).fit()
    err = capsys.readouterr().err
    assert f"took over the stale lock of pid {holder.pid} on host {socket.gethostname()} ({lock_file})" in err
    assert lock_file.read_text() == ""                                # released cleanly at the end


# ------------------------------------------------------------------------------------------------ resume guard
def test_changed_lr_is_refused_by_name_and_applied_with_force(tmp_path, capsys):
    trainer(tmp_path, steps=2).fit()
    with pytest.raises(ResumeConflict, match=r"method\.phases\.model\.lr: 0\.01 -> 0\.005; set train\.resume=force"):
        trainer(tmp_path, tiny_denoising_method(lr=5e-3), steps=3).fit()
    assert logged_steps(tmp_path) == [1, 2]
    forced = trainer(tmp_path, tiny_denoising_method(lr=5e-3), steps=3, resume="force")
    forced.open_run()
    assert forced.step == 2 and forced.optimizers["model"].param_groups[0]["lr"] == 5e-3
    forced.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == pytest.approx([1e-2, 1e-2, 5e-3])        # logged as float32
    manifest = json.loads((tmp_path / "checkpoints" / "step_000003" / "manifest.json").read_text())
    assert manifest["config"]["method.phases.model.lr"] == 5e-3


def test_cli_resume_guard_lists_changed_keys_keeps_config_yaml_and_force_records_the_new_values(tmp_path, capsys):
    common = [*TINY_RING, f"train.run_dir={tmp_path}"]
    assert train_main([*common, "train.steps=2"]) == 0
    capsys.readouterr()
    assert train_main([*common, "train.steps=3", "method.lr=1e-2", "model.hidden=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "method.lr: 0.001 -> 0.01; model.hidden: 16 -> 32;" in err
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text()       # a refused run changes nothing

    assert train_main([*common, "train.steps=3", "method.lr=1e-2", "train.resume=force"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings: method.lr: 0.001 -> 0.01" in err and "resuming from step 2" in err
    assert "lr: 0.01" in (tmp_path / "config.yaml").read_text()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == pytest.approx(1e-2)

    # train.steps, cadences and micro-batches are not run-defining: extending the run just resumes
    assert train_main([*common, "train.steps=4", "method.lr=1e-2", "train.log_every=2", "train.keep_last=3",
                       "train.micro_batches=2"]) == 0
    assert f"resuming from step 3 (checkpoint {tmp_path / 'checkpoints' / 'step_000003'})" in capsys.readouterr().err


def test_finished_run_says_so_and_rewrites_missing_final_outputs(tmp_path, capsys):
    common = [*TINY_RING, "train.steps=2", "train.sample_every=2", f"train.run_dir={tmp_path}"]
    assert train_main(common) == 0
    grid, export = tmp_path / "samples" / "step_000002.pt", tmp_path / "model"      # 2-D points: a tensor file
    final = load_file(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")
    grid.unlink()                                                    # as if killed after the final checkpoint,
    shutil.rmtree(export)
    (tmp_path / ".tmp-model-123").mkdir()                            # mid-export
    capsys.readouterr()
    assert train_main(common) == 0
    err = capsys.readouterr().err
    assert f"the run in {tmp_path} is finished (step 2, train.steps=2)" in err
    assert "wrote the missing final sample grid" in err and "wrote the missing export" in err
    assert grid.is_file() and (export / "fdistill.json").is_file() and not (tmp_path / ".tmp-model-123").exists()
    assert_bitwise_equal(load_file(tmp_path / "checkpoints" / "step_000002" / "model.safetensors"), final)
    assert logged_steps(tmp_path) == [1, 2]


def test_bad_resume_value_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"train\.resume must be one of \('auto', 'never', 'force'\) or an existing "
                                         r"checkpoint directory, got 'forse'"):
        TrainConfig(resume="forse")
