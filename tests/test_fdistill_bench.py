"""The f-distill benchmark scripts' own logic: trajectories during training, seed summaries, the within-class spread
of the digits benchmark, and argument errors."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

from fdistill.benchmarks.fdistill_2d import summarise, train_2d
from fdistill.benchmarks.fdistill_digits import recipe_steps
from fdistill.commands.distill import within_class_spread

SCRIPT_2D = Path(__file__).resolve().parents[1] / "scripts" / "bench_fdistill_2d.py"


def test_train_2d_records_a_trajectory_at_every_eval_step():
    _, metrics = train_2d("rkl", seed=0, steps=6, batch_size=32, num_eval=200, eval_every=2)
    assert [point[0] for point in metrics["trajectory"]] == [2, 4, 6]
    # the last trajectory point is the final evaluation (same evaluation noise)
    assert metrics["trajectory"][-1][1:] == [metrics["modes_covered"], round(metrics["tv"], 4),
                                             round(metrics["precision"], 4)]
    assert metrics["seconds"] > 0


def test_summarise_reports_means_and_the_worst_seed():
    runs = [{"modes_covered": 8, "tv": 0.1, "precision": 0.9, "seconds": 2.0},
            {"modes_covered": 6, "tv": 0.3, "precision": 0.7, "seconds": 4.0}]
    summary = summarise(runs)
    assert summary["modes_covered"] == 7 and summary["min_modes_covered"] == 6
    assert summary["tv"] == pytest.approx(0.2) and summary["max_tv"] == pytest.approx(0.3)
    assert summary["precision"] == pytest.approx(0.8) and summary["seconds"] == pytest.approx(3.0)


def test_2d_benchmark_rejects_an_unknown_divergence(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--divergences", "rkl,tv", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit) as error:
        runpy.run_path(str(SCRIPT_2D), run_name="__main__")
    assert error.value.code == 2
    assert "'tv'" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_within_class_spread_is_the_mean_per_pixel_std_of_each_class():
    # class 0: two images differing by 2 in every pixel (std sqrt(2)); class 1: identical images (std 0)
    images = torch.stack([torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), torch.full((1, 8, 8), 2.0), torch.zeros(1, 8, 8)])
    labels = torch.tensor([0, 1, 0, 1])
    assert within_class_spread(images, labels) == pytest.approx(2 ** 0.5 / 2)


def test_recipe_steps_follow_the_experiment_and_its_overrides():
    assert recipe_steps(["train.steps=123"]) == 123
    assert recipe_steps([]) > 0
