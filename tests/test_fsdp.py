"""FSDP (``fdistill.training.sharding``): 2 CPU processes (gloo) with sharded networks train the weights of 1 process,
clip by the global gradient norm, keep frozen weights bit-identical, write full checkpoints and plain exports, and
resume across process counts in both directions."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdistill.training import Trainer, TrainConfig
from fdistill.training.sharding import check_fsdp_support, fsdp_requested, shard_units

from factories import tiny_denoising_method
from test_trainer import cpu_launch_env, free_port
from trainer_helpers import ACCELERATE_LAUNCH, fsdp_method, fsdp_run_config, fsdp_samples, ring_data

TESTS = Path(__file__).resolve().parent

ACCELERATE_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
"""
CLIP = 0.05  # fsdp_method's max_grad_norm


def train_single(run: str, run_dir: Path) -> dict[str, torch.Tensor]:
    """The 1-process reference of an FSDP run (4 micro-batches: the 2 x 2 of the launched run): weights, samples."""
    method = fsdp_method(run)
    trainer = Trainer(method, ring_data(), fsdp_run_config(run_dir, micro_batches=4, export=run == "denoising"))
    trainer.fit()
    return {"weights": {k: v.detach().clone() for k, v in method.state_dict().items()}, "samples": fsdp_samples(trainer)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process references, then ONE ``accelerate launch --config_file fsdp.yaml`` of 2 processes doing every FSDP run
    ('resumed' starts from the reference's step-2 checkpoint)."""
    root = tmp_path_factory.mktemp("fsdp")
    single, double = root / "single", root / "double"
    initial_probe = {k: v.detach().clone() for k, v in fsdp_method("probe").state_dict().items()}
    reference = {run: train_single(run, single / run) for run in ("denoising", "probe")}
    shutil.copytree(single / "denoising" / "checkpoints" / "step_000002", double / "resumed" / "checkpoints" / "step_000002")
    (root / "fsdp.yaml").write_text(ACCELERATE_FSDP_CONFIG)
    launch = [*ACCELERATE_LAUNCH, "--config_file", str(root / "fsdp.yaml"), "--main_process_port", str(free_port())]
    done = subprocess.run([*launch, str(TESTS / "trainer_helpers.py"), "fsdp", str(double)], capture_output=True,
                          text=True, timeout=240, env=cpu_launch_env())
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {run: [torch.load(double / f"{run}_rank{k}.pt") for k in range(2)] for run in ("denoising", "probe", "resumed")}
    return {"single": single, "double": double, "reference": reference, "ranks": ranks, "initial_probe": initial_probe}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


def grad_norms(run_dir: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp_processes_train_the_weights_of_one_process(runs):
    single, double = runs["single"] / "denoising", runs["double"] / "denoising"
    for rank in runs["ranks"]["denoising"]:
        assert rank["fsdp"] and rank["local_share"] == pytest.approx(0.5, abs=0.02)   # each keeps half the weights
        assert_same_tensors(rank["weights"], runs["reference"]["denoising"]["weights"])
        # Trainer.generate on every process: full EMA copies of the sharded networks sample like one process
        torch.testing.assert_close(rank["samples"], runs["reference"]["denoising"]["samples"], rtol=1e-5, atol=1e-5)
    # clipping is active and uses the norm of the full gradient, not of a shard
    assert grad_norms(double) == pytest.approx(grad_norms(single), rel=1e-5) and min(grad_norms(single)) > CLIP
    # checkpoints hold full tensors: model, EMA and optimizer moments equal the 1-process run's
    for name in ("model.safetensors", "ema_0.9.safetensors"):
        assert_same_tensors(load_file(double / "checkpoints/step_000004" / name),
                            load_file(single / "checkpoints/step_000004" / name))
    moments = [torch.load(d / "checkpoints/step_000004/trainer_state.pt")["optimizers"]["model"]["state"]
               for d in (double, single)]
    assert moments[0].keys() == moments[1].keys()
    for index, values in moments[1].items():
        assert_same_tensors(moments[0][index], values)
    # export writes a plain (unsharded) model directory, EMA weights
    exported = [load_file(d / "model/unet/diffusion_pytorch_model.safetensors") for d in (double, single)]
    assert_same_tensors(*exported)
    assert json.loads((double / "model/fdistill.json").read_text()) == json.loads((single / "model/fdistill.json").read_text())


def test_frozen_parameters_stay_bit_identical_under_fsdp(runs):
    initial = runs["initial_probe"]
    for rank in runs["ranks"]["probe"]:
        weights = rank["weights"]
        for key in ("frozen.teacher.weight", "frozen.teacher.bias", "networks.student.0.weight", "networks.student.0.bias"):
            assert torch.equal(weights[key], initial[key]), key        # weight decay 0.5 would move them
        assert not torch.equal(weights["networks.student.2.weight"], initial["networks.student.2.weight"])
        assert_same_tensors(weights, runs["reference"]["probe"]["weights"])


def test_checkpoints_resume_across_process_counts(runs, tmp_path):
    # 1-process checkpoint -> 2 FSDP processes
    for rank in runs["ranks"]["resumed"]:
        assert_same_tensors(rank["weights"], runs["reference"]["denoising"]["weights"])
    # 2-FSDP-process checkpoint -> 1 process
    shutil.copytree(runs["double"] / "denoising" / "checkpoints" / "step_000002", tmp_path / "checkpoints" / "step_000002")
    method = fsdp_method("denoising")
    trainer = Trainer(method, ring_data(), fsdp_run_config(tmp_path, micro_batches=4, export=False))
    trainer.fit()
    assert not trainer.fsdp
    assert_same_tensors({k: v.detach() for k, v in method.state_dict().items()}, runs["reference"]["denoising"]["weights"])
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(runs["single"] / "denoising")[2:], rel=1e-5)


def test_fsdp_switches_units_and_unsupported_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested(False, "MULTI_CPU") and fsdp_requested(True, "MULTI_CPU")
    assert fsdp_requested(False, "DistributedType.FSDP")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")                 # accelerate launch with an FSDP config file
    assert fsdp_requested(False, "MULTI_CPU")

    network = tiny_denoising_method().networks["denoiser"]
    names = {id(m): n for n, m in network.named_modules()}
    units = [names[id(m)] for m in shard_units(network, 250)]
    assert units == ["net.blocks.0.2", "net.blocks.0.4", "net.noise_embedding.0", "net.noise_embedding.2",
                     "net.blocks.0", "net.noise_embedding", "net", ""]   # deepest first; ModuleList 'net.blocks' never
    assert [names[id(m)] for m in shard_units(network, 10 ** 9)] == ["net", ""]   # a direct child always

    phases = tiny_denoising_method().phases()
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp16' is not supported with FSDP: use 'bf16'"):
        check_fsdp_support(phases, "fp16")
    with pytest.raises(ValueError, match=r"method.optimizer='adafactor' \(phase 'model'\) .* \('adamw', 'adam'\)"):
        check_fsdp_support([phases[0].__class__("model", ("denoiser",), lr=1.0, optimizer="adafactor")], "bf16")
    with pytest.raises(ValueError, match="train.fsdp_min_params must be >= 1"):
        TrainConfig(fsdp_min_params=0)
    one = Trainer(tiny_denoising_method(), ring_data(), fsdp_run_config(tmp_path, fsdp=True, progress=False))
    assert not one.fsdp                                                 # one process: nothing to shard, the plain path


def test_fsdp_command_line_trains_the_diffusers_unet_like_one_process(tmp_path):
    """``fdistill train`` of the digits teacher (a Diffusers UNet2DModel) under ``accelerate launch`` with 2 FSDP
    processes (every submodule of >= 1000 parameters its own unit) logs the losses and exports the weights of one
    process with the same global batch (2 micro-batches)."""
    common = ["experiment=digits_teacher", "train.device=cpu", "train.steps=2", "train.checkpoint_every=100",
              "train.sample_every=100", "train.log_every=1", "train.progress=false", "train.lr_warmup_steps=0"]
    env = {**cpu_launch_env(), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "fdistill.cli", "train", *common, "train.micro_batches=2",
                             f"train.run_dir={tmp_path / 'single'}"], capture_output=True, text=True, env=env, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "fdistill.cli", "train"]
    double = subprocess.run([*launch, *common, "train.fsdp=true", "train.fsdp_min_params=1000", "train.micro_batches=1",
                             f"train.run_dir={tmp_path / 'double'}"], capture_output=True, text=True, env=env, timeout=240)
    assert double.returncode == 0, double.stderr[-2000:]
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("single", "double")}
    assert losses["double"] == pytest.approx(losses["single"], rel=1e-5)
    weights = {run: load_file(next((tmp_path / run / "model" / "unet").glob("*.safetensors")))
               for run in ("single", "double")}
    assert weights["single"].keys() == weights["double"].keys()
    for name, value in weights["single"].items():
        torch.testing.assert_close(weights["double"][name], value, atol=2e-5, rtol=1e-4)


def test_meta_copy_keeps_structure_and_ties_and_leaves_the_network_alone():
    from fdistill.networks import tiny_unet
    from fdistill.training.sharding import meta_copy

    network = tiny_unet(num_classes=10)
    copy_ = meta_copy(network)
    assert all(t.is_meta for t in (*copy_.parameters(), *copy_.buffers()))
    assert not any(t.is_meta for t in (*network.parameters(), *network.buffers()))
    assert [(n, p.shape, p.requires_grad) for n, p in copy_.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in network.named_parameters()]
    shared = torch.nn.Linear(3, 3)
    tied = meta_copy(torch.nn.Sequential(shared, torch.nn.ReLU(), shared))
    assert tied[0].weight is tied[2].weight
