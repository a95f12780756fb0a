"""EDMPrecond and the network factories of fdistill.networks."""
from __future__ import annotations

import math

import pytest
import torch

from fdistill.denoisers import EDMPrecond, GaussianMixtureDenoiser, edm_scalings
from fdistill.networks import MLPDenoiser, build_unet, cifar10_unet, digits_unet, tiny_unet


def test_edm_scalings_table_1_values():
    sigma_data = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor([0.5, 2.0]), sigma_data)
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25]))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4]))


def test_unet_precond_applies_skip_and_out_scalings_and_c_noise():
    """With conv_out = 0 weights and bias 1 the network outputs ones: D = c_skip x + c_out exactly."""
    denoiser = tiny_unet(num_classes=3, sigma_data=0.7)
    torch.nn.init.zeros_(denoiser.net.conv_out.weight)
    torch.nn.init.ones_(denoiser.net.conv_out.bias)
    seen = {}
    denoiser.net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(x_in=args[0], t=args[1], labels=kwargs["class_labels"]),
        with_kwargs=True)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 5.0])
    c_skip, c_out, c_in, _ = (c[:, None, None, None] for c in edm_scalings(sigma, 0.7))
    torch.testing.assert_close(denoiser(x, sigma), c_skip * x + c_out)
    torch.testing.assert_close(seen["x_in"], c_in * x)
    torch.testing.assert_close(seen["t"], 250 * sigma.log())          # 1000 * c_noise
    assert seen["labels"].tolist() == [3, 3]                           # cond=None -> null class = num_classes
    denoiser(x, sigma, torch.tensor([0, 2]))
    assert seen["labels"].tolist() == [0, 2] and denoiser.uncond(torch.tensor([0, 2])).tolist() == [3, 3]


def test_mlp_denoiser_starts_at_c_skip_x_and_fits_a_gaussian():
    """At init D = c_skip x (zero output layer); after training on N(m, s^2) it approaches the exact posterior mean."""
    torch.manual_seed(0)
    denoiser = MLPDenoiser(dim=2, hidden=64, depth=2, sigma_data=1.0)
    x, sigma = torch.randn(8, 2), torch.full((8,), 2.0)
    torch.testing.assert_close(denoiser(x, sigma), x / 5.0)            # c_skip = 1 / (1 + 4)
    exact = GaussianMixtureDenoiser(torch.tensor([[1.0, -1.0]]), torch.tensor([0.5]))

    def error() -> float:
        probe_sigma = torch.exp(torch.linspace(-1.5, 1.5, 256))
        probe = exact.sample(256) + probe_sigma[:, None] * torch.randn(256, 2)
        with torch.no_grad():
            return (denoiser(probe, probe_sigma) - exact(probe, probe_sigma)).square().mean().item()

    before = error()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    for _ in range(200):
        x0 = exact.sample(128)
        sigma = torch.exp(torch.randn(128) * 1.2 - 0.4)
        loss = (denoiser(x0 + sigma[:, None] * torch.randn_like(x0), sigma) - x0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.1 * before


def test_mlp_conditioning_and_features():
    denoiser = MLPDenoiser(dim=3, hidden=16, depth=3, num_classes=4)
    x, sigma = torch.randn(5, 3), torch.rand(5) + 0.1
    assert denoiser.features(x, sigma).shape == (5, 16)
    assert denoiser.feature_block == "blocks.1" and denoiser.sample_shape == (3,)
    torch.nn.init.normal_(denoiser.net.output[-1].weight)               # make the output depend on the label
    assert not torch.allclose(denoiser(x, sigma, torch.zeros(5, dtype=torch.long)), denoiser(x, sigma))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MLPDenoiser(depth=0)


def test_unet_presets_shapes_classes_and_features():
    digits = digits_unet()
    assert digits.num_classes == 10 and digits.net.config.num_class_embeds == 11
    assert digits.sample_shape == (1, 8, 8) and digits.conditioning == "class"
    x0, features = digits.x0_and_features(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 3.0]), torch.tensor([1, 9]))
    assert x0.shape == (2, 1, 8, 8) and features.shape == (2, 64, 4, 4)
    cifar = cifar10_unet()
    assert cifar.num_classes is None and cifar.sample_shape == (3, 32, 32)
    assert 30e6 < sum(p.numel() for p in cifar.parameters()) < 60e6
    with pytest.raises(ValueError, match="resolution 6 is not divisible"):
        build_unet(6, 1, (8, 16, 32), layers_per_block=1)
    with pytest.raises(ValueError, match="num_classes must be None"):
        tiny_unet(num_classes=0)
    with pytest.raises(ValueError, match="this network is unconditional"):
        tiny_unet()(torch.randn(1, 1, 8, 8), 1.0, torch.tensor([0]))


def test_low_precision_inside_float32_outside():
    reference = tiny_unet()
    low = EDMPrecond(tiny_unet().net, dtype=torch.bfloat16)
    low.net.load_state_dict(reference.net.state_dict())
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 4.0])
    out = low(x, sigma)
    assert out.dtype == torch.float32 and next(low.net.parameters()).dtype == torch.bfloat16
    assert (out - reference(x, sigma)).abs().max() < 0.05 * (1 + x.abs().max())
    assert low(x.double(), sigma).dtype == torch.float64


def test_tiny_unet_learns_digits_a_little():
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    data = torch.tensor(load_digits().images[:128], dtype=torch.float32)[:, None] / 8 - 1
    denoiser = tiny_unet()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    sigma = torch.full((128,), 0.5)
    noise = torch.randn_like(data)

    def loss() -> torch.Tensor:
        return (denoiser(data + sigma[:, None, None, None] * noise, sigma) - data).square().mean()

    before = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.7 * before


def test_instantiate_network_builds_the_target_with_hydra_and_names_a_bad_one():
    from fdistill.networks import instantiate_network

    net = instantiate_network({"_target_": "fdistill.networks.MLPDenoiser", "dim": 3, "hidden": 16, "depth": 1,
                               "sigma_data": 1.0})
    assert isinstance(net, MLPDenoiser) and net.sigma_data == 1.0
    assert net(torch.zeros(4, 3), torch.ones(4)).shape == (4, 3)
    with pytest.raises(ValueError, match=r"^method.network._target_ 'fdistill.networks.NoSuchNet' cannot be imported"):
        instantiate_network({"_target_": "fdistill.networks.NoSuchNet"})
    with pytest.raises(ValueError, match="'fdistill.networks.MLPDenoiser' cannot be imported or called: .*banana"):
        instantiate_network({"_target_": "fdistill.networks.MLPDenoiser", "banana": 1})
