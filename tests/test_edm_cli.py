"""EDM model directories (fdistill's DDPM++, ADM and EDM2 networks from config, tiny) through the commands:
``fdistill sample`` and ``fdistill fid`` of each network; a few steps of ``fdistill train
experiment=cifar10_fdistill`` (what ``fdistill distill`` runs before its digits evaluation) with the DDPM++ as the
teacher, and ``fdistill fid`` of the exported one-step generator; the DDO recipes on DDPM++ / EDM2 references."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fdistill.cli import main as cli_main
from fdistill.denoisers import load_denoiser
from fdistill.edm import edm_model_from_config, save_edm_model

# the shape of the recipes' placeholder data (digits: 1 x 8 x 8, 10 classes)
TEACHER = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[4], dropout=0.0)
EDM2 = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edm") / "teacher"
    return save_edm_model(edm_model_from_config("SongUNet", TEACHER, seed=0), directory)


def test_fdistill_sample_generates_from_an_edm_directory(teacher_dir, tmp_path):
    args = ["sample", "--no-progress", "--model", str(teacher_dir), "--num", "3", "--steps", "3", "--out"]
    assert cli_main([*args, str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["000000.png", "000001.png", "000002.png",
                                                                        "grid.png"]
    assert cli_main([*args, str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "000001.png").read_bytes() == (tmp_path / "b" / "000001.png").read_bytes()


@pytest.mark.parametrize("class_name, network", [("DhariwalUNet", TEACHER), ("EDM2UNet", EDM2)])
def test_sample_and_fid_commands_run_adm_and_edm2_directories(class_name, network, tmp_path):
    denoiser = edm_model_from_config(class_name, network, seed=0)
    with torch.no_grad():      # ADM's output layer and EDM2's gains start at zero (D = c_skip x, no label effect)
        for parameter in denoiser.net.parameters():
            parameter.fill_(1.0) if parameter.ndim == 0 else parameter.add_(0.05 * torch.randn_like(parameter))
    directory = save_edm_model(denoiser, tmp_path / "model")
    for label in ("3", "4"):
        assert cli_main(["sample", "--no-progress", "--model", str(directory), "--num", "1", "--steps", "2",
                         "--class", label, "--out", str(tmp_path / label)]) == 0
    assert (tmp_path / "3" / "000000.png").read_bytes() != (tmp_path / "4" / "000000.png").read_bytes()   # the label
    out = tmp_path / "fid.json"
    assert cli_main(["fid", "--gen", str(directory), "--num", "16", "--steps", "2", "--ref", "digits",
                     "--features", "digits", "--quiet", "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    assert score["num_gen"] == 16 and 0 < score["fid"] < float("inf")


def test_cifar10_fdistill_trains_from_an_edm_teacher_and_exports_a_generator_fid_can_score(teacher_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["experiment=cifar10_fdistill", f"model.path_or_hub_id={teacher_dir}", "train.steps=2",
                 "train.batch_size=8", "train.device=cpu", "train.progress=false", "train.sample_every=0",
                 "train.checkpoint_every=2", "method.student_update_freq=2", "train.ema_decays=[0.9]",
                 f"train.run_dir={run_dir}"]
    result = subprocess.run([sys.executable, "-m", "fdistill.cli", "train", *overrides], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((run_dir / "model" / "fdistill.json").read_text())
    assert (info["kind"], info["wrapper"], info["model_class"]) == ("generator", "edm_network", "SongUNet")
    teacher, _ = load_denoiser(teacher_dir)
    student, student_info = load_denoiser(run_dir / "model")
    assert student.precond == teacher.precond and student_info.num_classes == 10
    changed = [not torch.equal(a, b) for a, b in zip(student.net.parameters(), teacher.net.parameters())]
    assert any(changed)                                               # the student was trained away from the teacher
    out = tmp_path / "fid.json"
    assert cli_main(["fid", "--gen", str(run_dir / "model"), "--num", "32", "--batch-size", "16", "--ref", "digits",
                     "--features", "digits", "--quiet", "--out", str(out)]) == 0
    score = json.loads(out.read_text())
    assert score["num_gen"] == 32 and score["fid"] > 0


@pytest.mark.parametrize("experiment, class_name, network", [
    ("cifar10_ddo", "SongUNet", TEACHER),
    ("imagenet64_ddo", "EDM2UNet", EDM2),
])
def test_ddo_recipes_fine_tune_an_edm_reference(experiment, class_name, network, tmp_path):
    from fdistill.config import build_run, compose
    from fdistill.training import Trainer

    reference = save_edm_model(edm_model_from_config(class_name, network, seed=1), tmp_path / "reference")
    spec = compose([f"experiment={experiment}", f"model.path_or_hub_id={reference}", "train.steps=2",
                             "train.batch_size=8", "train.device=cpu", "train.progress=false", "train.sample_every=0",
                             "train.checkpoint_every=2", "method.steps_per_round=1", "method.rounds=2",
                             "method.fake_pool_size=16", "method.generation_batch=16", "method.eval_samples=16",
                             "sampler.steps=2", "train.mixed_precision=no", f"train.run_dir={tmp_path / 'run'}"])
    run = build_run(spec, with_loggers=False)
    Trainer(run.method, run.data, spec.train).fit()
    tuned, info = load_denoiser(tmp_path / "run" / "model")
    assert type(tuned.net).__name__ == class_name and info.num_classes == 10
    original, _ = load_denoiser(reference)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.net.parameters(), original.net.parameters()))
