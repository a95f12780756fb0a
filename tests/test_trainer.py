"""The training core (``fdistill.training``): hard-kill resume is bitwise exact, checkpoints are atomic and rotate,
2-process gradients equal 1-process ones, frozen weights never move, NaN stops the run, EMA / logs / sample grids."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from accelerate.tracking import GeneralTracker
from torch import nn

from fdistill.config import build_run, compose
from fdistill.data import gaussian_mixture
from fdistill.methods.base import Method
from fdistill.training import (JsonlLogger, NonFiniteLossError, Trackers, Trainer, TrainConfig, latest_checkpoint,
                               list_checkpoints, load_checkpoint, save_checkpoint)
from fdistill.training.ema import ema_decay_at

from factories import probe_method, tiny_denoising_method
from trainer_helpers import ACCELERATE_LAUNCH, train_and_record

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

TINY_RING = ["method=denoising", "model=mlp", "model.hidden=16", "model.depth=1", "data=gaussian_mixture",
             "data.num_samples=128", "train.batch_size=8", "train.device=cpu", "train.progress=false",
             "train.log_every=1", "sampler.steps=2", "train.num_samples=4"]


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}   # bitwise comparisons with in-process runs need it
    return subprocess.run([sys.executable, "-m", "fdistill.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, **kwargs)


def trainer_for(method: Method, run_dir: Path, **train) -> Trainer:
    config = TrainConfig(**{"steps": 4, "batch_size": 8, "device": "cpu", "progress": False, "log_every": 1,
                            "run_dir": str(run_dir), **train})
    return Trainer(method, gaussian_mixture(preset="ring8", num_samples=64), config)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ hard kill, resume
def test_sigkilled_cli_run_resumes_to_the_bitwise_weights_of_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "killed"
    common = [*TINY_RING, "train.steps=8", "train.checkpoint_every=2", "train.keep_last=2", f"train.run_dir={run_dir}"]
    killer = ["+logger._target_=trainer_helpers.kill_at_step", "+logger._partial_=true", "+logger.step=5"]
    killed = run_cli(["train", *common, *killer])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]   # died after step 5's update
    assert not (run_dir / "model").exists()

    resumed = run_cli(["train", *common])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_weights = load_file(run_dir / "checkpoints" / "step_000008" / "model.safetensors")

    spec = compose([*common[:-1], f"train.run_dir={tmp_path / 'straight'}"])
    straight = build_run(spec, with_loggers=False)
    Trainer(straight.method, straight.data, spec.train).fit()
    expected = straight.method.checkpoint_state_dict()
    assert resumed_weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed_weights[key], value), key

    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]             # step 5 (logged, then killed) is not duplicated on resume
    assert "train:" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "model" / "fdistill.json").is_file()


# ------------------------------------------------------------------------------------------------ atomic checkpoints
def test_checkpoint_write_dying_before_its_rename_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch):
    trainer = trainer_for(tiny_denoising_method(), tmp_path, steps=2, checkpoint_every=2, export=False)
    trainer.fit()
    good = state(trainer.method)

    def crash(*args):
        raise OSError("simulated crash before the rename")

    trainer.step = 4
    with torch.no_grad():
        next(trainer.method.parameters()).add_(1.0)
    monkeypatch.setattr("fdistill.training.checkpoint.os.rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save()
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert list(root.glob(".tmp-step_000004-*"))                       # the half-written temporary is left behind
    assert latest_checkpoint(root) == root / "step_000002"

    resumed = trainer_for(tiny_denoising_method(), tmp_path, steps=2, checkpoint_every=2, export=False)
    resumed.fit()                                                       # nothing left to train: only resumes
    assert resumed.step == 2 and resumed.last_checkpoint == root / "step_000002"
    assert all(torch.equal(v, good[k]) for k, v in resumed.method.state_dict().items())
    assert not list(root.glob(".tmp-*"))                                # stale temporaries are cleaned up


def test_keep_last_rotation_and_rewriting_a_step(tmp_path):
    trainer = trainer_for(tiny_denoising_method(), tmp_path, steps=5, checkpoint_every=1, keep_last=2, export=False)
    trainer.fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5]
    model = {"w": torch.ones(2)}
    save_checkpoint(tmp_path / "checkpoints", 5, model, {}, {"step": 5}, keep_last=2)   # same step again: replaced
    assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step_000005", [])[0]["w"], model["w"])
    with pytest.raises(FileNotFoundError, match="ema_decays"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000004", [0.9])


# ------------------------------------------------------------------------------------------------ data parallel
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch_env() -> dict[str, str]:
    """Environment for ``accelerate launch`` of CPU processes: GPUs hidden, else on a 1-GPU machine rank 1 asks
    for cuda:1 in accelerate's barrier (seen on an H200 machine)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_two_processes_average_gradients_like_one_process_on_the_same_global_batch(tmp_path):
    """accelerate's ``--cpu`` flag alone runs ONE process (its simple launcher); ``--multi_gpu`` starts torchrun, and
    Accelerator(cpu=True) then joins a gloo group: 2 processes on the CPU."""
    script = str(TESTS / "trainer_helpers.py")
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    train_and_record(single, micro_batches=2)                           # 1 process x 2 micro-batches, in-process
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, script, str(double), "1"], capture_output=True, text=True, timeout=120,
                         env=cpu_launch_env())
    assert two.returncode == 0, two.stderr[-2000:]

    reference = torch.load(single / "rank0.pt")
    ranks = [torch.load(double / f"rank{k}.pt") for k in range(2)]
    assert reference["num_processes"] == 1 and [r["num_processes"] for r in ranks] == [2, 2]
    assert all(g.abs().sum() > 0 for g in reference["gradients"])     # every parameter got a gradient
    for rank in ranks:
        for g1, g2 in zip(reference["gradients"], rank["gradients"]):
            torch.testing.assert_close(g2, g1, rtol=1e-6, atol=1e-7)
        for key, value in reference["weights"].items():                 # 3 steps later: still the same model
            torch.testing.assert_close(rank["weights"][key], value, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in reference["weights"])


# ------------------------------------------------------------------------------------------------ parameters, NaN
def test_frozen_parameters_stay_bit_identical_and_trainable_ones_change(tmp_path):
    method = probe_method()
    before = state(method)
    trainer_for(method, tmp_path, steps=3, export=False).fit()
    after = method.state_dict()
    for key in ("frozen.teacher.weight", "frozen.teacher.bias", "networks.student.0.weight", "networks.student.0.bias"):
        assert torch.equal(after[key], before[key]), key
    for key in ("networks.student.2.weight", "networks.student.2.bias"):
        assert not torch.equal(after[key], before[key]), key
    saved = load_file(tmp_path / "checkpoints" / "step_000003" / "model.safetensors")
    assert not any(k.startswith("frozen.") for k in saved)


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    method = probe_method(nan_at=4)                                             # the 5th step (0-based step 4) is NaN
    trainer = trainer_for(method, tmp_path, steps=10, checkpoint_every=2, keep_last=5)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4 .*finite: \S*step_000002$"):
        trainer.fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    last = load_file(tmp_path / "checkpoints" / "step_000004" / "model.safetensors")
    live = method.checkpoint_state_dict()
    assert all(torch.equal(live[k], last[k]) for k in last)          # the NaN step's update was not applied
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------------ EMA, logs, samples
class WeightRecorder(GeneralTracker):
    """Tracker that keeps the method's weights after every logged step."""

    name = "weight_recorder"
    requires_logging_directory = False

    def __init__(self, method: Method):
        super().__init__()
        self.method, self.history = method, []

    @property
    def tracker(self):
        return self.history

    def log(self, values, step=None, **kwargs):
        if "loss" in values:
            self.history.append(state(self.method.networks))


def test_ema_of_several_decays_follows_the_recursion(tmp_path):
    method = tiny_denoising_method()
    initial = state(method.networks)
    decays, warmup = [0.5, 0.9], 2
    config = TrainConfig(steps=4, batch_size=8, device="cpu", progress=False, log_every=1, run_dir=str(tmp_path),
                         ema_decays=decays, ema_warmup_steps=warmup, export=False)
    recorder = WeightRecorder(method)
    trainer = Trainer(method, gaussian_mixture(preset="ring8", num_samples=64), config,
                      trackers=Trackers(log_with=[recorder]))
    trainer.fit()
    assert len(recorder.history) == 4
    for decay in decays:
        expected = {k: v.float().clone() for k, v in initial.items()}
        for k_update, weights in enumerate(recorder.history):
            d = ema_decay_at(decay, k_update, warmup)
            expected = {k: d * v + (1 - d) * weights[k] for k, v in expected.items()}
        saved = load_file(tmp_path / "checkpoints" / "step_000004" / f"ema_{decay:g}.safetensors")
        for key, value in expected.items():
            torch.testing.assert_close(saved[f"networks.{key}"], value, rtol=1e-5, atol=1e-7)
    assert ema_decay_at(0.999, 0, 10) == pytest.approx(0.1) and ema_decay_at(0.999, 10, 10) == 0.999


def test_metrics_jsonl_and_sample_grid_png(tmp_path):
    overrides = ["experiment=digits_teacher", "model=tiny_unet", "model.num_classes=10", "train.steps=2",
                 "train.batch_size=4", "train.device=cpu", "train.progress=false", "train.sample_every=2",
                 "train.num_samples=4", "train.log_every=1", "sampler.steps=2", f"train.run_dir={tmp_path}"]
    spec = compose(overrides)
    run = build_run(spec, with_loggers=False)
    Trainer(run.method, run.data, spec.train).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert {"loss", "grad_norm", "lr", "steps_per_sec"} <= record.keys()
        # EDM-weighted loss of a barely trained network: about 1 per pixel (a sum over the 64 pixels would be ~100)
        assert 0.5 < record["loss"] < 5, record
    assert records[0]["lr"] == pytest.approx(2e-3 / 100)                 # digits_teacher: 100 warm-up steps
    with Image.open(tmp_path / "samples" / "step_000002.png") as grid:
        assert grid.size[0] == 2 * 8 * 16 + 3 and grid.size[1] > 256      # 2 x 2 digits enlarged 16x, captioned
        pixels = torch.from_numpy(np.asarray(grid.convert("L"), dtype=np.float32))
    assert pixels.std() > 0


def test_metrics_rows_after_the_resume_step_and_a_cut_last_row_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    logger = JsonlLogger(path)
    logger.start()
    logger.drop_after(2)
    logger.log({"loss": 0.5}, 3)
    logger.finish()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]      # no temporary left behind


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite_and_train(tmp_path, precision):
    """bf16 autocast; fp16 adds a loss scaler whose first too-large scale skips a step instead of corrupting weights."""
    method = tiny_denoising_method()
    before = state(method)
    trainer = trainer_for(method, tmp_path, steps=3, mixed_precision=precision, ema_decays=[0.9], export=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # e.g. 'lr_scheduler.step() before optimizer.step()'
        trainer.fit()
    after = method.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(before[k], v) for k, v in after.items()) == len(list(method.parameters()))
    skipped = 1 if precision == "fp16" else 0                           # 65536 x this loss overflows fp16 once
    assert trainer.ema.num_updates == 3 - skipped and trainer.schedulers["model"].last_epoch == 3 - skipped


def test_step_callbacks_run_before_each_step_and_again_after_a_resume(tmp_path):
    """``Method.callbacks``: ``on_phase_end`` once a phase's ``last_step`` is done (before the next step), then
    ``on_step_start``; a run resumed from the checkpoint written before a phase end makes that call again."""
    from fdistill.methods.base import Phase, StepCallback

    events = []

    class Recorder(StepCallback):
        def on_phase_end(self, phase, ctx):
            events.append(("end", phase.name, ctx.step))

        def on_step_start(self, phase, ctx):
            events.append(("start", phase, ctx.step))

    class TwoPhases(Method):
        def __init__(self):
            super().__init__()
            self.networks["net"] = nn.Linear(2, 2)
            self.recorder = Recorder()

        def phases(self):
            return [Phase("a", ("net",), lr=1e-2, last_step=1), Phase("b", ("net",), lr=1e-2)]

        def phase_at(self, step):
            return "a" if step < 2 else "b"

        def callbacks(self):
            return [self.recorder]

        def loss(self, phase, item, ctx):
            loss = self.networks["net"](item["x"]).pow(2).mean()
            return loss, {}

    def fit():
        config = TrainConfig(steps=4, batch_size=8, device="cpu", progress=False, export=False, checkpoint_every=1,
                             keep_last=4, ema_decays=[], sample_every=0, run_dir=str(tmp_path))
        Trainer(TwoPhases(), gaussian_mixture(preset="ring8", num_samples=64), config).fit()

    fit()
    assert events == [("start", "a", 0), ("start", "a", 1), ("end", "a", 2), ("start", "b", 2), ("start", "b", 3)]
    for step in (3, 4):
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step:06d}")
    events.clear()
    fit()                                                 # resumes at step 2: phase a's end has not been recorded
    assert events == [("end", "a", 2), ("start", "b", 2), ("start", "b", 3)]
