"""`fdistill train method=ddo`: the experiments compose and run with tiny stand-in models through the real trainer;
a killed run resumes into the right round."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fdistill.config import build_run, compose
from fdistill.denoisers import save_denoiser
from fdistill.networks import tiny_unet
from fdistill.training import Trainer

SHRINK = ["train.batch_size=8", "train.device=cpu", "train.progress=false", "train.sample_every=0",
          "train.checkpoint_every=1", "train.keep_last=3", "method.steps_per_round=1", "method.rounds=2",
          "method.fake_pool_size=16", "method.eval_samples=16", "sampler.steps=2", "train.mixed_precision=no"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    save_denoiser(tiny_unet(num_classes=10), directory)
    return directory


def fit(overrides, run_dir, steps):
    spec = compose([*overrides, *SHRINK, f"train.steps={steps}", f"train.run_dir={run_dir}"])
    run = build_run(spec, with_loggers=False)
    Trainer(run.method, run.data, spec.train).fit()
    return run.method


@pytest.mark.parametrize("overrides", [
    ["experiment=cifar10_ddo", "model=tiny_unet"],
    ["experiment=imagenet64_ddo", "model=tiny_unet", "model.num_classes=10"],
    ["experiment=gmm_ddo", "model=mlp", "~model.path_or_hub_id", "model.hidden=16", "data.num_samples=64", "method.generation_batch=16"],
], ids=["cifar10", "imagenet64", "gmm"])
def test_paper_experiments_compose_and_run_two_steps(overrides, tmp_path):
    method = fit(overrides, tmp_path, steps=2)
    assert int(method.round_index) == 1                                   # the second step opened round 1
    assert (tmp_path / "model" / "fdistill.json").is_file()
    assert json.loads((tmp_path / "ddo_rounds.json").read_text())["rounds"][1]["round"] == 1


def test_digits_ddo_rounds_and_resume_match_an_uninterrupted_run(base_model, tmp_path):
    overrides = ["experiment=digits_ddo", f"model.path_or_hub_id={base_model}"]
    straight = fit(overrides, tmp_path / "straight", steps=2)
    summary = json.loads((tmp_path / "straight" / "ddo_rounds.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1]
    assert all(row["start_score"] is not None and row["best_score"] <= row["start_score"] for row in summary["rounds"])
    checkpoint = load_file(tmp_path / "straight" / "checkpoints" / "step_000002" / "model.safetensors")
    assert any(k.startswith("frozen.reference.") for k in checkpoint)   # the swapped reference is checkpointed

    fit(overrides, tmp_path / "killed", steps=2)                          # as if killed after round 0 ...
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step_000002")
    resumed = fit(overrides, tmp_path / "killed", steps=2)                # ... resumes into round 1
    assert int(resumed.round_index) == 1
    for a, b in [(straight.frozen["reference"], resumed.frozen["reference"]),
                 (straight.frozen["best"], resumed.frozen["best"]), (straight.networks["model"], resumed.networks["model"])]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key


def test_run_killed_in_round_2_resumes_to_the_round_summary_of_an_uninterrupted_run(tmp_path, capsys):
    """Two rounds of two steps, evaluated every step: a run that loses its last checkpoint (killed after step 3 of
    4, inside round 2) resumes in round 2 with that round's best-snapshot bookkeeping and ends with the same
    per-round table and exported model."""
    shrink = [o for o in SHRINK if not o.startswith("method.steps_per_round=")]
    overrides = ["experiment=gmm_ddo", "model=mlp", "~model.path_or_hub_id", "model.hidden=16", "data.num_samples=64",
                 "method.generation_batch=16", "method.steps_per_round=2", "method.eval_every=1", *shrink,
                 "train.steps=4"]

    def fit_in(run_dir):
        spec = compose([*overrides, f"train.run_dir={run_dir}"])
        run = build_run(spec, with_loggers=False)
        Trainer(run.method, run.data, spec.train).fit()
        return json.loads((run_dir / "ddo_rounds.json").read_text())

    straight = fit_in(tmp_path / "straight")
    assert [row["round"] for row in straight["rounds"]] == [0, 1]
    assert all(None not in row.values() for row in straight["rounds"])
    fit_in(tmp_path / "killed")
    for lost in ("checkpoints/step_000004", "model"):                    # killed before step 4 was saved
        shutil.rmtree(tmp_path / "killed" / lost)
    (tmp_path / "killed" / "ddo_rounds.json").unlink()
    capsys.readouterr()
    resumed = fit_in(tmp_path / "killed")
    assert "resuming from step 3" in capsys.readouterr().err
    assert resumed["evaluator"] == straight["evaluator"] == "sliced_wasserstein"
    for row, expected in zip(resumed["rounds"], straight["rounds"], strict=True):
        assert row == pytest.approx(expected, rel=1e-6), (row, expected)
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    exported, expected = load_file(tmp_path / "killed" / weights), load_file(tmp_path / "straight" / weights)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_train_steps_must_cover_the_rounds_exactly():
    from fdistill.config import ConfigError

    overrides = ["experiment=gmm_ddo", "model=mlp", "~model.path_or_hub_id", *SHRINK]
    with pytest.raises(ConfigError, match=r"train.steps \(3\) must equal method.rounds \* method.steps_per_round = "
                                          r"2 \* 1 = 2"):
        compose([*overrides, "train.steps=3"])
    assert compose([*overrides, "train.steps=2"]).train.steps == 2
