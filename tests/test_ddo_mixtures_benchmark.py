"""The DDO random-mixture benchmark's generator, metrics and one tiny run."""

from fdistill.benchmarks.ddo_mixtures import EVAL_SAMPLER, distribution_metrics, run_mixture
from fdistill.benchmarks.mixtures import random_mixture
from fdistill.denoisers import GaussianMixtureDenoiser


def test_the_exact_teacher_measures_close_to_the_mixture():
    """20-step samples of the exact denoiser: TV and SW1 near 0, precision near 1; a teacher of the wrong weights
    (uniform) scores a larger TV and SW1."""
    mixture = random_mixture(1, dim=2)
    exact = distribution_metrics(GaussianMixtureDenoiser(mixture["means"], mixture["stds"], mixture["weights"]),
                                 mixture, num=4000)
    uniform = distribution_metrics(GaussianMixtureDenoiser(mixture["means"], mixture["stds"]), mixture, num=4000)
    assert EVAL_SAMPLER.steps == 20
    assert exact["mode_tv"] < 0.03 and exact["precision"] > 0.97 and exact["sw1"] < 0.05, exact
    assert uniform["mode_tv"] > exact["mode_tv"] + 0.1 and uniform["sw1"] > 2 * exact["sw1"], uniform


def test_one_tiny_run_reports_the_base_and_each_round_selected_by_sliced_wasserstein():
    result = run_mixture(0, {"base_steps": 2, "rounds": 2, "steps_per_round": 2, "samples": 200})
    assert [row["round"] for row in result["rows"]] == ["base", 1, 2]
    assert result["selection"]["evaluator"] == "sliced_wasserstein"
    assert all(set(row) >= {"sw1", "mode_tv", "precision"} for row in result["rows"])
