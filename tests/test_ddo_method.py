"""DDO method: frozen reference, 1:1 fakes, class balance, self-play round boundaries, checkpoint / resume.

A minimal stand-in for the trainer loop (the method contract of fdistill/methods/base.py) drives the method, so
these tests do not depend on the trainer's internals; tests/test_ddo_cli.py runs the real `fdistill train`.
"""
import copy
import json
import math

import pytest
import torch

from fdistill.evaluation.frechet import FeatureStats, fid_from_stats
from fdistill.methods.base import StepContext, run_step_callbacks
from fdistill.methods.ddo import DDO, DDOConfig, build, class_balanced_labels, sample_with
from fdistill.networks import MLPDenoiser

SAMPLER = {"solver": "dpmpp_2m", "steps": 4, "sigma_min": 0.01, "sigma_max": 10.0}


def tiny_config(**overrides):
    settings = dict(lr=1e-2, fake_pool_size=32, generation_batch=32, eval_samples=16, steps_per_round=4,
                    sampler=SAMPLER)
    settings.update(overrides)
    return DDOConfig(**settings)


def tiny_denoiser(num_classes=None):
    torch.manual_seed(0)
    return MLPDenoiser(dim=2, hidden=16, depth=1, embed_dim=8, num_classes=num_classes)


class TinyTrainer:
    """The trainer's step as documented in fdistill/methods/base.py: the method's callbacks, then one optimizer per
    phase."""

    def __init__(self, method):
        self.method = method
        self.optimizers = {p.name: torch.optim.AdamW(
            [q for n in p.networks for q in method.networks[n].parameters() if q.requires_grad], lr=p.lr)
            for p in method.phases()}

    def step(self, step, batch):
        phase = self.method.phase_at(step)
        run_step_callbacks(self.method, phase, StepContext(step=step))
        prepared = self.method.prepare_step(phase, [batch], StepContext(step=step))
        optimizer = self.optimizers[phase]
        optimizer.zero_grad()
        for item in prepared:
            loss, logs = self.method.loss(phase, item, StepContext(step=step))
            (loss / len(prepared)).backward()
        optimizer.step()
        return loss.item(), prepared


def real_batch(num=16, num_classes=0):
    batch = {"x": torch.randn(num, 2) * 0.2 + 0.5}
    if num_classes:
        batch["label"] = torch.arange(num) % num_classes
    return batch


def state_copy(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_config_validation_names_the_field():
    for field, value in [("alpha", 0.4), ("alpha", 7.0), ("beta", 0.2), ("beta", 0.001), ("rounds", 0),
                         ("label_dropout", 1.0), ("evaluator", "fid50k")]:
        with pytest.raises(ValueError, match=f"method.{field}"):
            tiny_config(**{field: value})


def test_first_step_loss_is_1_plus_alpha_log2_and_only_the_target_learns():
    method = DDO(tiny_config(alpha=2.0), tiny_denoiser(), (2,))
    method.assert_frozen()
    reference_before = state_copy(method.frozen["reference"])
    target_before = state_copy(method.networks["model"])
    assert same_state(reference_before, target_before)           # the target starts as the reference
    trainer = TinyTrainer(method)
    first_loss, prepared = trainer.step(0, real_batch())
    assert first_loss == pytest.approx(3 * math.log(2), abs=1e-6)
    assert prepared[0]["x_fake"].shape == prepared[0]["x"].shape   # real : fake = 1 : 1
    for step in range(1, 3):
        trainer.step(step, real_batch())
    assert same_state(reference_before, method.frozen["reference"].state_dict())
    assert not same_state(target_before, method.networks["model"].state_dict())
    assert all(p.grad is None for p in method.frozen.parameters())


def test_fakes_are_reference_samples_with_class_balanced_labels():
    method = DDO(tiny_config(fake_pool_size=40), tiny_denoiser(num_classes=4), (2,), num_classes=4)
    prepared = method.prepare_step("round_0", [real_batch(8, 4)], StepContext(step=0))
    pool_x, pool_labels = method._pool
    assert pool_x.shape == (40, 2) and torch.bincount(pool_labels).tolist() == [10] * 4
    assert prepared[0]["label_fake"].shape == (8,)
    loss, logs = method.loss("round_0", prepared[0], StepContext(step=0))
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    assert torch.bincount(class_balanced_labels(7, 3)).tolist() == [3, 2, 2]


def test_label_dropout_needs_classes():
    with pytest.raises(ValueError, match="label_dropout"):
        DDO(tiny_config(label_dropout=0.1), tiny_denoiser(), (2,), num_classes=0)


def scripted_evaluator(scores):
    scores = iter(scores)
    return lambda samples: next(scores)


def test_round_boundary_swaps_reference_regenerates_fakes_and_resets_optimizer():
    # round 0: evaluations at steps 0 (start), 2, and 4 (end); the one at step 2 is the best
    method = DDO(tiny_config(rounds=2, eval_every=2), tiny_denoiser(), (2,),
                 evaluate=scripted_evaluator([5.0, 3.0, 4.0, 9.0, 9.0, 9.0]))
    trainer = TinyTrainer(method)
    assert [p.name for p in method.phases()] == ["round_0", "round_1"]
    pretrained = state_copy(method.frozen["reference"])
    snapshots = {}
    for step in range(4):
        snapshots[step] = state_copy(method.networks["model"])
        trainer.step(step, real_batch())
        assert same_state(pretrained, method.frozen["reference"].state_dict())   # bit-identical within the round
    pool_round_0 = method._pool[0].clone()
    assert len(trainer.optimizers["round_0"].state) > 0 and len(trainer.optimizers["round_1"].state) == 0
    run_step_callbacks(method, method.phase_at(4), StepContext(step=4))          # before step 4: round 0 ends
    assert int(method.round_index) == 1 and method.phase_at(4) == "round_1"
    assert same_state(snapshots[2], method.frozen["reference"].state_dict())     # the best snapshot (step 2)
    assert same_state(snapshots[2], method.networks["model"].state_dict())       # is also the new starting point
    assert not torch.equal(pool_round_0, method._pool[0])                         # fakes regenerated
    assert len(trainer.optimizers["round_1"].state) == 0                          # fresh optimizer for round 1
    assert method.round_summary()["rounds"][0] == {"round": 0, "start_score": 5.0, "best_score": 3.0,
                                                   "best_step": 2.0, "end_score": 4.0}


def test_checkpoint_holds_the_replaced_reference_and_resume_continues_the_round():
    def fresh():
        return DDO(tiny_config(rounds=3, steps_per_round=2), tiny_denoiser(), (2,))

    method = fresh()
    assert not any(k.startswith("frozen.") for k in method.checkpoint_state_dict())   # pretrained: rebuilt from config
    trainer = TinyTrainer(method)
    for step in range(3):                    # steps 0, 1 in round 0; step 2 opens round 1 (no evaluator: final target)
        trainer.step(step, real_batch())
    checkpoint = copy.deepcopy(method.checkpoint_state_dict())
    assert any(k.startswith("frozen.reference.") for k in checkpoint)
    resumed = fresh()
    resumed.load_state_dict(checkpoint, strict=False)
    assert int(resumed.round_index) == 1
    assert same_state(method.frozen["reference"].state_dict(), resumed.frozen["reference"].state_dict())
    run_step_callbacks(resumed, resumed.phase_at(3), StepContext(step=3))
    run_step_callbacks(method, method.phase_at(3), StepContext(step=3))
    assert int(resumed.round_index) == 1                                   # no second swap on resume
    torch.testing.assert_close(resumed._pool[0], method._pool[0], rtol=1e-5, atol=1e-6)   # the same round-1 fakes


def test_finished_rounds_free_their_optimizer_state_and_checkpoints_do_not_grow(tmp_path):
    """The real trainer, 3 rounds of 2 steps, a checkpoint every step: at most one round's Adam moments exist at any
    time, and checkpoints in (and at the end of) rounds 1 and 3 have the same size."""
    from fdistill.data.base import DataSource, TensorDictDataset
    from fdistill.training import Trainer, TrainConfig

    method = DDO(tiny_config(rounds=3, steps_per_round=2), tiny_denoiser(), (2,))
    data = DataSource(TensorDictDataset(x=real_batch(64)["x"]), (2,), 0)
    trainer = Trainer(method, data, TrainConfig(steps=6, batch_size=8, device="cpu", progress=False, export=False,
                                                checkpoint_every=1, keep_last=6, ema_decays=[], run_dir=str(tmp_path)))
    trainer.fit()
    root = tmp_path / "checkpoints"
    trained = len(list(method.networks.parameters()))
    for step in range(1, 7):      # after step k - 1: the moments of its round while it runs, none once it is done
        state = torch.load(root / f"step_{step:06d}" / "trainer_state.pt", weights_only=True)
        moments = {name: len(optimizer["state"]) for name, optimizer in state["optimizers"].items()}
        running = None if step % 2 == 0 else f"round_{step // 2}"
        assert moments == {f"round_{r}": trained if f"round_{r}" == running else 0 for r in range(3)}, (step, moments)
    size = lambda step: (root / f"step_{step:06d}" / "trainer_state.pt").stat().st_size  # noqa: E731
    one_round_of_moments = size(1) - size(2)         # the same file with and without one round's moments
    assert one_round_of_moments > 10_000
    for early, late in ((1, 5), (2, 6)):             # within round 1 vs round 3; at their ends (zip padding aside)
        assert abs(size(late) - size(early)) < one_round_of_moments / 50, [size(k) for k in range(1, 7)]


def test_build_with_evaluator_and_finish_writes_summary(tmp_path):
    data = type("Data", (), {"sample_shape": (2,), "num_classes": 0, "dataset": [{"x": torch.randn(2)} for _ in range(64)]})
    config = tiny_config(rounds=1, evaluator="raw_frechet", summary_path=str(tmp_path / "ddo_rounds.json"))
    method = build(config, tiny_denoiser(), data)
    trainer = TinyTrainer(method)
    for step in range(2):
        trainer.step(step, real_batch())
    summary = method.finish()
    written = json.loads((tmp_path / "ddo_rounds.json").read_text())
    assert written == summary and len(summary["rounds"]) == 1
    row = summary["rounds"][0]
    # the start score is raw_frechet of the round's first target (a copy of the reference) on the seeded draw
    eval_noise = torch.Generator().manual_seed(config.seed)
    samples = sample_with(method.frozen["reference"], config.eval_samples, (2,), config.sampler, None, eval_noise,
                          config.generation_batch)
    dataset = FeatureStats().update(torch.stack([item["x"] for item in data.dataset]).double())
    assert row["start_score"] == pytest.approx(fid_from_stats(FeatureStats().update(samples.double()), dataset),
                                               rel=1e-6)
    assert row["end_score"] != row["start_score"]                       # two steps moved the target
    assert row["best_score"] == min(row["start_score"], row["end_score"])


def two_mode_data(num=2000):
    """Gaussian-mixture data: modes at (-1, 0) and (1, 0), std 0.1, equal weights."""
    from fdistill.data import gaussian_mixture

    return gaussian_mixture(means=[[-1.0, 0.0], [1.0, 0.0]], stds=0.1, num_samples=num, seed=0)


def moment_matched_gaussian_and_unbalanced_modes(data, num=2000):
    """Two candidate sample sets: a single Gaussian with the data's mean and covariance (no modes; Frechet ~ 0) and
    the two modes with weights 0.7 / 0.3 (the modes right, their shares off by 0.2)."""
    generator = torch.Generator().manual_seed(1)
    points = data.dataset.tensors["x"].double()
    cholesky = torch.linalg.cholesky(points.T.cov())
    gaussian = points.mean(0) + torch.randn(num, 2, generator=generator, dtype=torch.float64) @ cholesky.T
    side = torch.where(torch.rand(num, generator=generator) < 0.7, -1.0, 1.0).double()
    unbalanced = torch.stack([side, torch.zeros(num, dtype=torch.float64)], 1) \
        + 0.1 * torch.randn(num, 2, generator=generator, dtype=torch.float64)
    return gaussian, unbalanced


@pytest.mark.parametrize("evaluator, expected_best", [("raw_frechet", 0), ("auto", 1), ("sliced_wasserstein", 1)])
def test_snapshot_selection_follows_the_evaluator_where_frechet_and_sliced_wasserstein_disagree(
        monkeypatch, evaluator, expected_best):
    """Step 0 samples a moment-matched single Gaussian, step 1 the unbalanced two modes: the two-moment Frechet
    distance prefers the Gaussian, sliced Wasserstein (the default for vector data) the modes."""
    import fdistill.methods.ddo_rounds as rounds_module

    data = two_mode_data()
    candidates = list(moment_matched_gaussian_and_unbalanced_modes(data))
    monkeypatch.setattr(rounds_module, "sample_with", lambda *args, **kwargs: candidates.pop(0))
    method = build(tiny_config(rounds=1, evaluator=evaluator), tiny_denoiser(), data)
    scores = [method._evaluate_target(step) for step in (0, 1)]
    assert (scores[0] < scores[1]) == (expected_best == 0), scores
    assert method.round_summary()["rounds"][0]["best_step"] == expected_best
    assert method.round_summary()["evaluator"] == ("sliced_wasserstein" if evaluator == "auto" else evaluator)


def test_auto_evaluator_is_none_for_images_and_mode_tv_needs_a_mixture():
    from fdistill.methods.ddo import resolve_evaluator

    assert DDOConfig().evaluator == "auto"
    assert resolve_evaluator("auto", (1, 8, 8)) == "none" and resolve_evaluator("auto", (2,)) == "sliced_wasserstein"
    assert resolve_evaluator("digits_fd", (1, 8, 8)) == "digits_fd"
    data = type("Data", (), {"sample_shape": (2,), "num_classes": 0, "extras": {},
                             "dataset": [{"x": torch.randn(2)} for _ in range(8)]})
    with pytest.raises(ValueError, match="mode_tv needs Gaussian-mixture data"):
        build(tiny_config(evaluator="mode_tv"), tiny_denoiser(), data)
