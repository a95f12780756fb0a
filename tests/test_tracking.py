"""What a run shows its user: accelerate trackers (metrics.jsonl, tensorboard, wandb offline), per-phase scalars,
labelled sample grids, the curves PNG and ``fdistill plot``, start banner / end summary, LR schedules."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from fdistill.config import build_run, compose
from fdistill.images import labelled_grid, fit_text
from fdistill.training import Trackers, Trainer, TrainConfig
from fdistill.training.logging import flat_hparams, phase_scalars
from fdistill.training.plots import curves, wants_log_scale, write_curves
from fdistill.training.optimization import build_lr_scheduler, warmup_factor

REPO = Path(__file__).resolve().parent.parent
TINY_DIGITS = ["experiment=digits_teacher", "model=tiny_unet", "model.num_classes=10", "train.steps=2",
               "train.batch_size=4", "train.device=cpu", "train.progress=false", "train.sample_every=2",
               "train.num_samples=4", "train.log_every=1", "sampler.steps=2", "train.export=false"]
TINY_GMM_FDISTILL = ["experiment=gmm_fdistill", "method.network.hidden=16", "method.network.depth=1",
                     "method.head_width=8", "data.num_samples=64", "train.steps=4", "train.batch_size=8",
                     "train.log_every=2", "train.progress=false", "train.export=false",
                     "method.regression_warmup_steps=0", "method.critic_warmup_steps=0",     # both phases from step 0
                     "method.student_update_freq=2"]                                           # in every 2 steps


def train(overrides: list[str], run_dir: Path) -> Trainer:
    """``fdistill train`` in-process: compose (the logger group included), build, fit."""
    spec = compose([*overrides, f"train.run_dir={run_dir}"])
    run = build_run(spec)
    trainer = Trainer(run.method, run.data, spec.train, trackers=run.trackers)
    trainer.fit()
    return trainer


# ------------------------------------------------------------------------------------------------ trackers
def test_tensorboard_event_file_holds_hparams_scalars_and_the_sample_grid(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    train([*TINY_DIGITS, "logger=tensorboard"], tmp_path)
    logdir = tmp_path / "tensorboard" / "fdistill"
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"loss", "grad_norm", "lr", "steps_per_sec"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    (grid,) = events.Images("samples")
    assert grid.step == 2 and min(grid.width, grid.height) >= 256
    # add_hparams writes a run of its own (a sub-folder) holding the session's hyper-parameters
    (hparams_run,) = [p for p in logdir.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]
    session = EventAccumulator(str(hparams_run))
    session.Reload()
    content = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.steps"].number_value == 2 and hparams["system.device"].string_value == "cpu"
    assert hparams["system.params_trained"].number_value > 0 and hparams["logger.log_with"].string_value
    out = capsys.readouterr().out
    assert "global_batch      4" in out and "params_trained" in out                    # start banner
    assert f"curves       {tmp_path / 'curves.png'}" in out and "tensorboard" in out     # end summary


def test_wandb_offline_run_gets_the_config_scalars_and_grid_and_keeps_its_id(tmp_path, monkeypatch):
    """``logger=wandb`` used to crash at start-up (``wandb.util.generate_id`` is gone in wandb 0.31)."""
    import wandb

    logged = []
    original = wandb.Run.log

    def recording_log(run, data, step=None, **kwargs):
        logged.append((step, data))
        return original(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", recording_log)
    trainer = train([*TINY_DIGITS, "logger=wandb", "logger.mode=offline"], tmp_path)
    run = trainer.accelerator.get_tracker("wandb", unwrap=True)
    assert run.id == (tmp_path / "wandb_run_id").read_text() and run.offline
    assert run.config["train.steps"] == 2 and run.config["system.processes"] == 1
    scalar_steps = [step for step, data in logged if "loss" in data]
    assert scalar_steps == [1, 2] and {"grad_norm", "lr"} <= logged[0][1].keys()
    (images,) = [data["samples"] for step, data in logged if "samples" in data and step == 2]
    assert isinstance(images[0], wandb.Image)
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))


def test_tracker_settings_are_checked():
    with pytest.raises(ValueError, match=r"logger.log_with: unknown tracker\(s\) \['tensorbord'\]"):
        Trackers(log_with=["tensorbord"])
    with pytest.raises(ValueError, match="logger.mode must be one of"):
        Trackers(log_with=["wandb"], mode="offlne")


def test_methods_with_several_phases_log_each_phase_every_log_step(tmp_path):
    """f-distill alternates critic and student steps; with log_every=2 each log row holds both phases' scalars
    (the latest of each since the last log), not one zig-zag ``loss``."""
    train(TINY_GMM_FDISTILL, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert {"critic/loss", "student/loss", "critic/lr", "student/grad_norm"} <= row.keys()
        assert "loss" not in row
    assert (tmp_path / "curves.png").is_file()


def test_phase_scalars_and_flat_hparams():
    assert phase_scalars({"loss": 1.0}, "critic", True) == {"critic/loss": 1.0}
    assert phase_scalars({"loss": 1.0}, "model", False) == {"loss": 1.0}
    assert flat_hparams({"train": {"steps": 3, "ema_decays": [0.9]}, "seed": None, "ok": True}) == {
        "train.steps": 3, "train.ema_decays": "[0.9]", "seed": "None", "ok": True}


# ------------------------------------------------------------------------------------------------ grids
def test_labelled_grid_enlarges_tiny_images_by_nearest_neighbour_and_captions_them():
    images = torch.linspace(-1, 1, 4 * 8 * 8).reshape(4, 1, 8, 8)
    grid = labelled_grid(images, ["0", "1", "2", "3"], nrow=2)
    strip = ImageFont.load_default().getbbox("Ag")[3] + 4
    assert grid.shape == (1 + 2 * (128 + strip + 1), 1 + 2 * 128 + 2, 3)          # 16x: 2 * 8 * 16 >= 256
    first = grid[1:129, 1:129, 0].astype(int)
    assert (first[::16, ::16] == first[:16 * 8:16, :16 * 8:16]).all()
    assert (first.reshape(8, 16, 8, 16) == first[::16, ::16][:, None, :, None]).all()   # 16 x 16 blocks
    caption = grid[129:129 + strip, 1:129]
    assert caption.max() == 255 and caption.min() < 128                           # white strip, dark text
    assert labelled_grid(images, nrow=2).shape == (1 + 2 * 129, 1 + 2 * 129, 3)    # no labels: no strip


def test_fit_text_cuts_long_prompts_to_the_image_width():
    font = ImageFont.load_default()
    assert fit_text("7", font, 64) == "7"
    cut = fit_text("a photograph of an astronaut riding a horse", font, 64)
    assert cut.endswith("...") and font.getlength(cut) <= 64 and len(cut) > 3


# ------------------------------------------------------------------------------------------------ curves
def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')


def test_curves_group_phases_in_one_panel_and_order_loss_metrics_lr():
    rows = [{"step": 1, "critic/loss": 2.0, "student/loss": 1.0, "critic/lr": 0.1, "steps_per_sec": 3.0},
            {"step": 2, "critic/loss": 1.5, "student/loss": None, "eval/fid": 30.0, "ratio_mean": 0.5}]
    panels = curves(rows)
    assert list(panels) == ["loss", "eval/fid", "lr", "ratio_mean"]
    assert panels["loss"] == {"critic/loss": ([1, 2], [2.0, 1.5]), "student/loss": ([1], [1.0])}
    assert wants_log_scale([1000.0, 1.0]) and not wants_log_scale([2.0, 1.0]) and not wants_log_scale([-1.0, 1e3])


def test_fdistill_plot_writes_the_png_and_rejects_a_folder_without_metrics(tmp_path):
    write_metrics(tmp_path / "run", [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 6)])
    done = subprocess.run([sys.executable, "-m", "fdistill.cli", "plot", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "run" / "curves.png") as png:
        assert png.size[0] >= 600 and np.asarray(png.convert("L")).std() > 0
    missing = subprocess.run([sys.executable, "-m", "fdistill.cli", "plot", str(tmp_path / "nothing")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "metrics.jsonl: no such file" in missing.stderr
    assert write_curves(tmp_path / "nothing" / "metrics.jsonl", tmp_path / "x.png") is None


# ------------------------------------------------------------------------------------------------ LR schedules
def lrs(name: str, warmup: int, updates: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, name, warmup, updates)
    values = []
    for _ in range(updates):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_default_schedule_is_the_linear_warmup_of_before_and_diffusers_schedules_are_available():
    assert TrainConfig().lr_scheduler == "linear_warmup"
    assert lrs("linear_warmup", 4, 6) == pytest.approx([warmup_factor(4)(k) for k in range(6)])
    assert lrs("linear_warmup", 4, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # diffusers: warm-up from 0, then cosine to 0 at the last update count
    expected = [k / 2 for k in range(2)] + [0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)]
    assert lrs("cosine", 2, 10) == pytest.approx(expected)
    assert lrs("constant_with_warmup", 2, 4) == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_cosine_schedule_of_each_phase_spans_that_phase_s_updates(tmp_path):
    train([*TINY_GMM_FDISTILL, "train.lr_scheduler=cosine", "train.log_every=1"], tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    critic = [row["critic/lr"] for row in rows[::2]]        # steps 0 and 2 are critic steps: 2 critic updates
    assert critic == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))])


def test_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="train.lr_scheduler must be one of"):
        TrainConfig(lr_scheduler="cosin")
    with pytest.raises(ValueError, match="train.lr_warmup_steps=10 has no effect with train.lr_scheduler='constant'"):
        TrainConfig(lr_scheduler="constant", lr_warmup_steps=10)


def test_grid_condition_cycles_classes_or_prompts_and_captions_them():
    from types import SimpleNamespace

    from fdistill.training.outputs import grid_condition

    classes, labels = grid_condition(SimpleNamespace(num_classes=3), 5, torch.device("cpu"))
    assert classes.tolist() == [0, 1, 2, 0, 1] and labels == ["0", "1", "2", "0", "1"]
    prompts, labels = grid_condition(SimpleNamespace(num_classes=0, prompts=["a cat", "a dog"]), 3, torch.device("cpu"))
    assert prompts == labels == ["a cat", "a dog", "a cat"]
    assert grid_condition(SimpleNamespace(), 2, torch.device("cpu")) == (None, None)


def test_config_groups_come_from_the_checkout_the_code_runs_from():
    """An editable install of another checkout must not hand its ``conf/`` (without ``logger/tensorboard.yaml``)
    to this checkout's code."""
    import fdistill
    from fdistill.config import config_dir

    assert config_dir() == Path(fdistill.__file__).resolve().parent.parent / "conf"
    assert (config_dir() / "logger" / "tensorboard.yaml").is_file()
