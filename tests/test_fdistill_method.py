"""f-distill method: exact gradients against analytic teachers / students, global normalisation statistics,
phases, frozen teacher, ratio-bin state."""
import copy
import dataclasses
import math
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from fdistill.data.base import DataSource, TensorDictDataset
from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.losses.fdistill import f_divergence_weight
from fdistill.methods.base import StepContext
from fdistill.methods.fdistill import FDistill, FDistillConfig, PixelDomain, build
from fdistill.networks import MLPDenoiser
from fdistill.training import Trainer
from fdistill.training.config import TrainConfig

from test_trainer import cpu_launch_env, free_port
from trainer_helpers import ACCELERATE_LAUNCH, ratio_bin_weights

TESTS = Path(__file__).resolve().parent

TEACHER = dict(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], stds=[0.4, 0.5, 0.3], weights=[0.6, 0.3, 0.1])
STUDENT = dict(means=[[-1.5, 0.3], [2.2, -0.2], [0.3, 2.0]], stds=[0.6, 0.4, 0.5], weights=[0.2, 0.5, 0.3])


class Particles(nn.Module):
    """A 'generator' whose samples are its parameters: d loss / d particles is the gradient wrt the samples."""

    def __init__(self, points):
        super().__init__()
        self.points = nn.Parameter(points.clone())

    def forward(self, x, sigma, cond=None):
        return self.points


def gmm(spec):
    return GaussianMixtureDenoiser(torch.tensor(spec["means"]), torch.tensor(spec["stds"]), torch.tensor(spec["weights"]))


def exact_method(divergence, num_bins=0, batch=64, **overrides):
    """Analytic teacher p, analytic fake score q (exact), student = particles drawn from q, exact log-ratio logits."""
    teacher, fake = gmm(TEACHER), gmm(STUDENT)
    points = fake.sample(batch, torch.Generator().manual_seed(3))
    config = FDistillConfig(divergence=divergence, num_ratio_bins=num_bins, gan_weight=0.0, sigma_distribution="loguniform",
                            sigma_min=0.05, sigma_max=3.0, **overrides)
    method = FDistill(config, teacher, Particles(points), fake, PixelDomain((2,)))
    method.discriminator_logit = lambda x_t, sigma, cond=None: teacher.log_density(x_t, sigma) - fake.log_density(x_t, sigma)
    return method, teacher, fake


def by_hand_dmd2(method, teacher, fake, item):
    x = method.networks["student"].points.detach()
    x_t = x + item.sigma[:, None] * item.eps
    x0_teacher, x0_fake = teacher(x_t, item.sigma), fake(x_t, item.sigma)
    normaliser = (x - x0_teacher).abs().mean(1, keepdim=True) + method.config.normaliser_eps
    return (x0_fake - x0_teacher) / normaliser, x_t


def student_grad(method, item):
    method.zero_grad()
    loss, _ = method.loss("student", item, StepContext(step=0))
    loss.backward()
    return method.networks["student"].points.grad


def test_rkl_student_gradient_equals_dmd2_by_hand():
    method, teacher, fake = exact_method("rkl")
    (item,) = method.prepare_step("student", [{"x": torch.zeros(64, 2)}], StepContext(step=0))
    assert item.weight is None                                  # rkl needs no density ratio
    g, _ = by_hand_dmd2(method, teacher, fake, item)
    assert torch.allclose(student_grad(method, item), g / (64 * 2), atol=1e-7)


@pytest.mark.parametrize("divergence", ["kl", "js", "neyman"])
def test_exact_ratio_weights_and_gradient(divergence):
    method, teacher, fake = exact_method(divergence)
    (item,) = method.prepare_step("student", [{"x": torch.zeros(64, 2)}], StepContext(step=0))
    g, x_t = by_hand_dmd2(method, teacher, fake, item)
    log_ratio = (teacher.log_density(x_t, item.sigma) - fake.log_density(x_t, item.sigma)).clamp(-10, 10)
    h = f_divergence_weight(log_ratio.exp().clamp(0.1, 20.0), divergence)
    expected_weight = h / h.mean()
    assert torch.allclose(item.weight, expected_weight, rtol=1e-5)
    assert abs(float(item.weight.mean()) - 1.0) < 1e-6
    assert torch.allclose(student_grad(method, item), expected_weight[:, None] * g / (64 * 2), atol=1e-7)


def test_ratio_is_normalised_per_quantile_bin():
    method, teacher, fake = exact_method("js", num_bins=4)
    (item,) = method.prepare_step("student", [{"x": torch.zeros(64, 2)}], StepContext(step=0))
    _, x_t = by_hand_dmd2(method, teacher, fake, item)
    r = (teacher.log_density(x_t, item.sigma) - fake.log_density(x_t, item.sigma)).clamp(-10, 10).exp().clamp(0.1, 20)
    bins = (item.u * 4).long()
    bin_means = torch.stack([r[bins == b].mean() for b in range(4)])
    h = f_divergence_weight(r / bin_means[bins], "js")
    assert torch.allclose(item.weight, h / h.mean(), rtol=1e-5)
    assert torch.allclose(method.ratio.bin_means.float(), bin_means, rtol=1e-5)
    # loguniform sigma: the quantile u is exactly the normalised log sigma
    assert torch.allclose(item.u, (item.sigma.log() - torch.tensor(0.05).log()) / (torch.tensor(3.0).log() - torch.tensor(0.05).log()), atol=1e-5)


def run_processes(methods, logits, quantiles, training=True):
    """Each method instance is one process (a thread); all_reduce_mean / all_reduce_sum reduce across them with a
    barrier (a simulated all-reduce)."""
    barrier, slots, results = threading.Barrier(len(methods)), {}, [None] * len(methods)

    def all_reduce_for(rank, reduction):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            reduced = reduction(torch.stack([slots[r] for r in range(len(methods))]), 0)
            barrier.wait()
            return reduced
        return reduce

    def worker(rank):
        ctx = StepContext(step=0, num_micro_batches=len(logits[rank]), num_processes=len(methods),
                          all_reduce_mean=all_reduce_for(rank, torch.mean), all_reduce_sum=all_reduce_for(rank, torch.sum),
                          training=training)
        results[rank] = methods[rank].normalized_weights(logits[rank], quantiles[rank], ctx)[0]

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(len(methods))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [torch.cat(weights) for weights in results]


def test_statistics_equal_for_1x4_and_2x2_micro_batches():
    base, _, _ = exact_method("js", num_bins=10, ratio_ema=0.5)
    one, two_a, two_b = base, copy.deepcopy(base), copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):                                            # two steps: the EMA state must agree as well
        logits = torch.randn(64, generator=generator) * 2
        quantiles = torch.rand(64, generator=generator)
        chunks_l, chunks_q = logits.chunk(4), quantiles.chunk(4)
        single = run_processes([one], [list(chunks_l)], [list(chunks_q)])[0]
        pair = run_processes([two_a, two_b], [list(chunks_l[:2]), list(chunks_l[2:])], [list(chunks_q[:2]), list(chunks_q[2:])])
        assert torch.allclose(single, torch.cat(pair), rtol=1e-6)
        assert abs(float(single.mean()) - 1.0) < 1e-6
    assert torch.allclose(one.ratio.bin_means, two_a.ratio.bin_means) and torch.equal(two_a.ratio.bin_means, two_b.ratio.bin_means)
    assert not torch.allclose(one.ratio.bin_means, torch.ones(10))


def test_sparse_bins_over_8_processes_equal_one_process_on_the_global_batch():
    """16 bins, 8 processes with 2 samples each: most bins hold 1 sample of the global batch (fewer than processes);
    their means must still be exact (a mean-reduced count of 1/8, clamped to 1, would divide them by 8)."""
    base, _, _ = exact_method("kl", num_bins=16)
    generator = torch.Generator().manual_seed(7)
    logits, quantiles = torch.randn(16, generator=generator) * 2, torch.rand(16, generator=generator)
    single = run_processes([base], [[logits]], [[quantiles]])[0]
    processes = [copy.deepcopy(base) for _ in range(8)]
    split = run_processes(processes, [[l] for l in logits.chunk(8)], [[q] for q in quantiles.chunk(8)])
    counts = torch.bincount((quantiles * 16).long(), minlength=16)
    assert ((counts > 0) & (counts < 8)).sum() >= 8                       # the sparse case the test is about
    torch.testing.assert_close(torch.cat(split), single, rtol=1e-6, atol=1e-7)
    for method in processes:
        torch.testing.assert_close(method.ratio.bin_means, base.ratio.bin_means, rtol=1e-12, atol=0)


def test_two_cpu_processes_give_the_ratio_bin_means_of_one(tmp_path):
    """The same check through the trainer's real collectives: 2 gloo processes under ``accelerate launch``."""
    single, double = tmp_path / "single", tmp_path / "double"
    ratio_bin_weights(single)                                           # 1 process, in-process
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, str(TESTS / "trainer_helpers.py"), "ratio_bins", str(double)], capture_output=True,
                         text=True, timeout=180, env=cpu_launch_env())
    assert two.returncode == 0, two.stderr[-2000:]
    reference = torch.load(single / "ratio_rank0.pt")
    ranks = [torch.load(double / f"ratio_rank{k}.pt") for k in range(2)]
    assert reference["num_processes"] == 1 and [r["num_processes"] for r in ranks] == [2, 2]
    torch.testing.assert_close(torch.cat([r["weights"] for r in ranks]), reference["weights"], rtol=1e-6, atol=1e-7)
    for rank in ranks:
        torch.testing.assert_close(rank["bin_means"], reference["bin_means"], rtol=1e-12, atol=0)


def test_validation_never_updates_bins_and_bins_are_state():
    method, _, _ = exact_method("kl", num_bins=10, ratio_ema=0.5)
    logits, quantiles = [torch.randn(32)], [torch.rand(32)]
    method.normalized_weights(logits, quantiles, StepContext(step=0, training=False))
    assert torch.equal(method.ratio.bin_means, torch.ones(10)) and not method.ratio.bins_seen.any()
    method.normalized_weights(logits, quantiles, StepContext(step=0))
    stored = method.ratio.bin_means.clone()
    assert not torch.equal(stored, torch.ones(10))
    state = method.checkpoint_state_dict()
    assert torch.equal(state["ratio.bin_means"], stored) and "ratio.bins_seen" in state
    assert not any(key.startswith("frozen.") for key in state)
    assert torch.equal(copy.deepcopy(method).ratio.bin_means, stored)   # EMA snapshots are deep copies


def test_unknown_divergence_and_bad_fields_fail_with_allowed_values():
    with pytest.raises(ValueError) as error:
        FDistillConfig(divergence="tv")
    assert all(name in str(error.value) for name in ("rkl", "kl", "js", "sf", "sh", "jf", "neyman"))
    with pytest.raises(ValueError, match="student_update_freq"):
        FDistillConfig(student_update_freq=1)
    with pytest.raises(ValueError, match="method.lr"):
        FDistillConfig(lr=0)
    with pytest.raises(ValueError, match="sigma_distribution"):
        FDistillConfig(sigma_distribution="uniform")
    with pytest.raises(ValueError, match="method.features"):
        FDistillConfig(features="clip")


def points_data(num=256):
    points = gmm(TEACHER).sample(num, torch.Generator().manual_seed(0))
    return DataSource(TensorDictDataset(x=points), (2,), 0, extras={"denoiser": gmm(TEACHER)})


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


@pytest.mark.parametrize("features", ["teacher", "fake_score"])
def test_phases_train_only_their_networks_and_teacher_stays_frozen(features, tmp_path):
    teacher = MLPDenoiser(dim=2, hidden=32, depth=2)
    data = points_data()
    method = build(FDistillConfig(divergence="js", student_update_freq=2, lr=1e-2, gan_weight=0.1, features=features),
                   teacher, data)
    assert [p.name for p in method.phases()] == ["student", "critic"]
    assert [method.phase_at(s) for s in range(4)] == ["critic", "student", "critic", "student"]
    trainer = Trainer(method, data, TrainConfig(steps=4, batch_size=32, micro_batches=2, run_dir=str(tmp_path),
                                                device="cpu", progress=False, ema_decays=[0.9]))
    batches = data.loader(32)
    teacher_before = snapshot(method.frozen["teacher"])
    assert all(torch.equal(a, b) for a, b in zip(snapshot(method.networks["student"]), teacher_before))
    for step in range(4):
        phase = method.phase_at(step)
        before = {name: snapshot(net) for name, net in method.networks.items()}
        logs = trainer.train_step(step, next(batches))
        trained = {"student": {"student"}, "critic": {"fake_score", "discriminator"}}[phase]
        for name, net in method.networks.items():
            assert changed(net, before[name]) == (name in trained), (phase, name)
            # no stale gradient is left for the other phase's optimizer (the trainer clears only the phase it steps)
            assert all(p.grad is None for p in net.parameters()), (phase, name)
        assert math.isfinite(logs["loss"])
    assert not changed(method.frozen["teacher"], teacher_before)
    assert "student/weight_max" in logs and "student/ratio_mean" in logs and "critic/fake_score" not in logs
    assert not torch.equal(method.ratio.bin_means, torch.ones(10))
    assert torch.equal(trainer.ema.state_dict(0.9)["ratio.bin_means"], method.ratio.bin_means)


def test_build_from_analytic_teacher_needs_a_network_spec_and_generates():
    data = points_data()
    with pytest.raises(ValueError, match="method.network"):
        build(FDistillConfig(), None, data)
    spec = {"_target_": "fdistill.networks.MLPDenoiser", "dim": 2, "hidden": 16, "depth": 1}
    method = build(FDistillConfig(network=spec, generator_sigma=2.5), None, data)
    x, sigma = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), torch.full((5,), 0.7)
    torch.testing.assert_close(method.frozen["teacher"](x, sigma), gmm(TEACHER)(x, sigma))   # the data's exact one
    student_size = sum(p.numel() for p in method.networks["student"].parameters())
    assert student_size == sum(p.numel() for p in MLPDenoiser(dim=2, hidden=16, depth=1).parameters())  # the spec's
    assert method.networks["discriminator"].backbone is not None      # analytic teacher: own feature net
    samples = method.generate(10, torch.Generator().manual_seed(0))
    assert samples.shape == (10, 2) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="cannot be imported"):
        build(FDistillConfig(network={"_target_": "fdistill.networks.NoSuchNet"}), None, data)


def test_one_micro_batch_student_step_reuses_the_weighting_forward():
    """The weights need the student's samples and their logits; with one micro-batch the loss reuses that forward
    (graph kept) instead of running student and discriminator again, and the gradient is the same."""
    torch.manual_seed(0)
    data = points_data()
    method = build(FDistillConfig(divergence="js", gan_weight=0.1), MLPDenoiser(dim=2, hidden=32, depth=2), data)
    calls = {"student": 0, "head": 0}
    for name, module in (("student", method.networks["student"]), ("head", method.networks["discriminator"].head)):
        module.register_forward_hook(lambda *_, key=name: calls.__setitem__(key, calls[key] + 1))

    def student_gradient(item):
        method.zero_grad(set_to_none=True)
        method.loss("student", item, StepContext(step=0))[0].backward()
        return [p.grad.clone() for p in method.networks["student"].parameters()]

    with torch.no_grad():                                   # as the trainer calls it
        (item,) = method.prepare_step("student", [next(data.loader(32))], StepContext(step=0))
    kept = student_gradient(item)
    assert calls == {"student": 1, "head": 1}
    assert all(p.grad is None for net in ("fake_score", "discriminator") for p in method.networks[net].parameters())
    recomputed = student_gradient(dataclasses.replace(item, generated=None, student_logit=None))
    assert calls == {"student": 2, "head": 2}
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept, recomputed))
