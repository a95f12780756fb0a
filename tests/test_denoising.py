"""The ``denoising`` method (EDM teacher training): loss formula, label dropout, learning, export."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fdistill.data import digits
from fdistill.methods.base import StepContext
from fdistill.methods.denoising import DenoisingConfig, build, drop_labels
from fdistill.networks import tiny_unet


class ZeroDenoiser(nn.Module):
    """x0_hat = 0 (so the loss is lambda(sigma) * mean(x0^2) whatever the noise); records the labels it gets."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen_labels: list[torch.Tensor] = []

    def forward(self, x, sigma, cond=None):
        self.seen_labels.append(cond)
        return torch.zeros_like(x) + 0 * self.weight


def test_edm_loss_equals_formula_at_fixed_sigma():
    """p_std ~ 0 fixes sigma = exp(p_mean); EDM Eq. 8: lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
    sigma, sigma_data = 0.3, 0.5
    config = DenoisingConfig(p_mean=math.log(sigma), p_std=1e-12, sigma_data=sigma_data)
    data = digits(split="test")
    method = build(config, ZeroDenoiser(), data)
    x0 = torch.stack([data.dataset[i]["x"] for i in range(16)])
    loss, logs = method.loss("model", {"x": x0, "label": torch.zeros(16, dtype=torch.long)}, StepContext(step=0))
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    assert loss.item() == pytest.approx(weight * x0.pow(2).mean().item(), rel=1e-5)
    assert logs["loss"] == pytest.approx(loss.item())


def test_edm_loss_of_a_unet_reproduces_its_random_draws():
    """The loss of a real network equals the formula evaluated on the same sigma / noise draws."""
    config = DenoisingConfig(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    data = digits(split="test")
    net = tiny_unet(num_classes=10)
    method = build(config, net, data)
    x0 = torch.stack([data.dataset[i]["x"] for i in range(8)])
    labels = torch.arange(8)
    torch.manual_seed(123)
    loss, _ = method.loss("model", {"x": x0, "label": labels}, StepContext(step=0))
    torch.manual_seed(123)
    sigma = (-1.2 + 1.2 * torch.randn(8)).exp()
    noise = torch.randn_like(x0)
    with torch.no_grad():
        x0_hat = net(x0 + sigma[:, None, None, None] * noise, sigma, labels)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_dropout_uses_the_null_class_only_when_training():
    labels = torch.randint(0, 10, (4000,))
    dropped = drop_labels(labels, 0.3, null_class=10)
    changed = dropped != labels
    assert (dropped[changed] == 10).all() and (dropped[~changed] == labels[~changed]).all()
    assert changed.float().mean().item() == pytest.approx(0.3 * 1.0, abs=0.03)  # labels are never 10 already
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)

    data = digits(split="test")
    denoiser = ZeroDenoiser()
    method = build(DenoisingConfig(label_dropout=0.5), denoiser, data)
    item = {"x": torch.zeros(400, 1, 8, 8), "label": torch.randint(0, 10, (400,))}
    method.loss("model", item, StepContext(step=0, training=True))
    method.loss("model", item, StepContext(step=0, training=False))
    train_labels, eval_labels = denoiser.seen_labels
    assert (train_labels == 10).float().mean().item() == pytest.approx(0.5, abs=0.08)
    assert torch.equal(eval_labels, item["label"])
    with pytest.raises(ValueError, match="method.label_dropout"):
        DenoisingConfig(label_dropout=1.0)


def held_out_loss(method, data, seed: int = 7, repeats: int = 4) -> float:
    """Mean EDM loss on the held-out split under fixed (seeded) sigma / noise draws (a paired comparison)."""
    batch = {k: torch.stack([data.dataset[i][k] for i in range(len(data.dataset))]) for k in ("x", "label")}
    torch.manual_seed(seed)
    with torch.no_grad():
        losses = [method.loss("model", batch, StepContext(step=0, training=False))[0] for _ in range(repeats)]
    return torch.stack(losses).mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional UNet trained 60 steps on the digits train split by the real Trainer, exported."""
    from fdistill.training import Trainer
    from fdistill.training.config import TrainConfig

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast, and far faster when the 2 cores are shared
    train_data, test_data = digits(split="train"), digits(split="test")
    method = build(DenoisingConfig(lr=3e-3, label_dropout=0.1), tiny_unet(num_classes=10), train_data)
    before = held_out_loss(method, test_data)
    run_dir = tmp_path_factory.mktemp("denoising_run")
    config = TrainConfig(steps=60, batch_size=64, checkpoint_every=1000, log_every=20, run_dir=str(run_dir),
                         device="cpu", progress=False)
    Trainer(method, train_data, config).fit()
    torch.set_num_threads(threads)
    return method, before, held_out_loss(method, test_data), run_dir / "model"


def test_a_few_steps_lower_the_held_out_loss(trained):
    _, before, after, _ = trained
    assert after < 0.8 * before, (before, after)


def test_export_loads_in_fdistill_and_plain_diffusers(trained):
    from diffusers import UNet2DModel

    from fdistill.denoisers import load_denoiser

    method, _, _, model_dir = trained
    network = method.networks["denoiser"].eval()
    loaded, info = load_denoiser(model_dir)
    assert info.kind == "denoiser" and info.num_classes == 10 and tuple(info.sample_shape) == (1, 8, 8)
    x, sigma, labels = torch.randn(5, 1, 8, 8), torch.tensor([0.01, 0.1, 1.0, 5.0, 40.0]), torch.arange(5)
    with torch.no_grad():
        assert torch.allclose(loaded(x, sigma, labels), network(x, sigma, labels), atol=1e-6)
        plain = UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval()
        timestep = torch.full((5,), 3.0)
        assert torch.allclose(plain(x, timestep, class_labels=labels).sample,
                              network.net(x, timestep, class_labels=labels).sample, atol=1e-6)
