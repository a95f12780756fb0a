"""The DDO random-mixture benchmark's generator, metrics and one tiny run."""
import itertools

import pytest
import torch

from fdistill.benchmarks.ddo_mixtures import EVAL_SAMPLER, ddo_random_mixture, distribution_metrics, run_mixture
from fdistill.denoisers import GaussianMixtureDenoiser


@pytest.mark.parametrize("seed", range(12))
def test_random_mixture_follows_the_family_spec(seed):
    mixture = ddo_random_mixture(seed)
    weights, means, stds = mixture["weights"], mixture["means"], mixture["stds"]
    assert 3 <= len(weights) <= 8 and means.shape == (len(weights), 2) and stds.shape == (len(weights),)
    assert weights.sum().item() == pytest.approx(1.0)
    assert 30 <= (weights.max() / weights.min()).item() <= 60
    assert weights.min().item() >= 0.01
    assert ((0.05 <= stds) & (stds <= 0.15)).all() and (means.abs() <= 2).all()
    for i, j in itertools.combinations(range(len(weights)), 2):
        assert (means[i] - means[j]).norm().item() >= 1.2


def test_random_mixture_is_deterministic_from_its_seed_and_varies_across_seeds():
    first, again = ddo_random_mixture(3), ddo_random_mixture(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    counts = {len(ddo_random_mixture(seed)["weights"]) for seed in range(12)}
    assert len(counts) >= 3                                        # the family spans several mode counts
    assert ddo_random_mixture(0, dim=8)["means"].shape[1] == 8


def test_the_exact_teacher_measures_close_to_the_mixture():
    """20-step samples of the exact denoiser: TV and SW1 near 0, precision near 1; a teacher of the wrong weights
    (uniform) scores a larger TV and SW1."""
    mixture = ddo_random_mixture(1)
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
