"""The f-distill benchmark scripts' own logic: trajectories during training, seed summaries, the within-class spread
of the digits benchmark, and argument errors."""
import pytest
import torch

from fdistill.benchmarks.fdistill_2d import parse_divergences, summarise, train_2d
from fdistill.benchmarks.fdistill_digits import recipe_steps
from fdistill.commands.distill import within_class_spread
from fdistill.losses.fdistill import DIVERGENCES


def test_train_2d_records_a_trajectory_at_every_eval_step():
    _, metrics = train_2d("rkl", seed=0, steps=6, batch_size=32, num_eval=200, eval_every=2)
    assert [point[0] for point in metrics["trajectory"]] == [2, 4, 6]
    # the last trajectory point is the final evaluation (same evaluation noise)
    assert metrics["trajectory"][-1][1:] == [metrics["modes_covered"], round(metrics["tv"], 4),
                                             round(metrics["precision"], 4)]


def test_summarise_reports_means_and_the_worst_seed():
    runs = [{"modes_covered": 8, "tv": 0.1, "precision": 0.9, "seconds": 2.0},
            {"modes_covered": 6, "tv": 0.3, "precision": 0.7, "seconds": 4.0}]
    summary = summarise(runs)
    assert summary["modes_covered"] == 7 and summary["min_modes_covered"] == 6
    assert summary["tv"] == pytest.approx(0.2) and summary["max_tv"] == pytest.approx(0.3)
    assert summary["precision"] == pytest.approx(0.8) and summary["seconds"] == pytest.approx(3.0)


def test_2d_benchmark_divergence_list_names_an_unknown_divergence():
    assert parse_divergences("rkl,js") == ("rkl", "js")
    assert parse_divergences("all") == DIVERGENCES
    with pytest.raises(ValueError, match="unknown 'tv'; allowed: .*neyman"):
        parse_divergences("rkl,tv")


def test_within_class_spread_is_the_mean_per_pixel_std_of_each_class():
    # class 0: two images differing by 2 in every pixel (std sqrt(2)); class 1: identical images (std 0)
    images = torch.stack([torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), torch.full((1, 8, 8), 2.0), torch.zeros(1, 8, 8)])
    labels = torch.tensor([0, 1, 0, 1])
    assert within_class_spread(images, labels) == pytest.approx(2 ** 0.5 / 2)


def test_recipe_steps_follow_the_command_line_overrides():
    assert recipe_steps(["train.steps=123"]) == 123
