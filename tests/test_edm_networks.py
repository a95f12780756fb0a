"""fdistill.edm: the EDM / EDM2 networks (shapes, parameter counts of the published sizes), the preconditioning of
EDM Table 1 against hand computation, and EDM model directories through load_denoiser / save_denoiser."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fdistill import architectures
from fdistill.denoisers import load_denoiser, save_denoiser
from fdistill.edm import NETWORK_CLASSES, EDMNetworkDenoiser, Preconditioning, edm_model_from_config, save_edm_model

TINY_SONG = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[4], dropout=0.0)
TINY = {
    "ddpmpp": ("SongUNet", TINY_SONG),
    "ncsnpp": ("SongUNet", dict(TINY_SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                                resample_filter=[1, 3, 3, 1])),
    "ncsnpp_skip": ("SongUNet", dict(TINY_SONG, encoder_type="skip", decoder_type="skip")),
    "adm": ("DhariwalUNet", dict(TINY_SONG, attn_resolutions=[8, 4])),
    "edm2": ("EDM2UNet", dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[4], channels_per_head=8)),
}


def tiny_denoiser(name: str, precond: dict | None = None, seed: int = 0) -> EDMNetworkDenoiser:
    """A tiny network with every weight random (the zero-initialised output layers too, so outputs depend on them)."""
    class_name, network = TINY[name]
    denoiser = edm_model_from_config(class_name, network, precond, seed=seed).eval()
    with torch.no_grad():
        for param in denoiser.net.parameters():
            if not param.abs().sum():
                param.normal_()
    return denoiser


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_networks_map_images_to_images_and_expose_bottleneck_features(name):
    denoiser = tiny_denoiser(name)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 50.0]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        x0, features = denoiser.x0_and_features(x, sigma, labels)
    assert x0.shape == x.shape and x0.dtype == torch.float32 and torch.isfinite(x0).all()
    assert features.shape == (3, 32, 4, 4)                       # the 4x4 bottleneck, 2 x 16 channels
    assert denoiser.sample_shape == (3, 8, 8) and denoiser.num_classes == 4


def test_labels_index_one_hot_and_null_class_is_the_zero_vector():
    denoiser = tiny_denoiser("ddpmpp")
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        by_index = denoiser(x, sigma, torch.tensor([1, 4]))            # 4 = num_classes = the null class
        one_hot = denoiser(x, sigma, torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32))
        null = denoiser(x, sigma, None)
        other = denoiser(x, sigma, torch.tensor([2, 4]))
    torch.testing.assert_close(by_index, one_hot)
    torch.testing.assert_close(by_index[1], null[1])
    assert not torch.allclose(by_index[0], other[0])
    assert denoiser.uncond(torch.tensor([0, 1])).tolist() == [4, 4]


class Recorder(torch.nn.Module):
    """A 'network' returning a fixed F and recording what it was called with."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output, self.weight, self.bottleneck, self.sample_shape = output, torch.nn.Parameter(torch.zeros(1)), "", (1, 1, 2)

    def forward(self, x_in, c_noise, labels):
        self.seen = (x_in, c_noise)
        return self.output


@pytest.mark.parametrize("kind, expected", [
    # sigma = 2, sigma_data = 0.5:  c_skip = 0.25 / 4.25, c_out = 1 / sqrt(4.25), c_in = 1 / sqrt(4.25), ln(2) / 4
    ("edm", (0.25 / 4.25, 1 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2) / 4)),
    # VP, beta_d 19.9, beta_min 0.1, M 1000: c_noise = 999 (sqrt(0.01 + 39.8 ln 5) - 0.1) / 19.9
    ("vp", (1.0, -2.0, 1 / math.sqrt(5), 999 * (math.sqrt(0.01 + 39.8 * math.log(5)) - 0.1) / 19.9)),
    ("ve", (1.0, 2.0, 1.0, math.log(1.0))),
])
def test_preconditioning_is_edm_table_1(kind, expected):
    c_skip, c_out, c_in, c_noise = expected
    raw = torch.tensor([[[[3.0, -1.0]]]])
    denoiser = EDMNetworkDenoiser(Recorder(raw), Preconditioning(kind))
    x = torch.tensor([[[[0.7, 0.2]]]])
    out = denoiser(x, torch.tensor([2.0]))
    torch.testing.assert_close(out, c_skip * x + c_out * raw)
    torch.testing.assert_close(denoiser.net.seen[0], c_in * x)
    torch.testing.assert_close(denoiser.net.seen[1], torch.tensor([c_noise]))


def test_vp_sigma_inverse_inverts_the_vp_schedule():
    precond, t = Preconditioning("vp"), torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    sigma = (torch.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1).sqrt()
    torch.testing.assert_close(precond.vp_sigma_inverse(sigma), t)


# name in fdistill.architectures -> the paper's parameter count (EDM Table 7; EDM2 Table 3: S = 280 M)
PAPER_PARAMETERS = {"edm-cifar10-32x32-cond-vp": 55.7e6, "edm-imagenet-64x64-cond-adm": 295.9e6,
                    "edm2-img64-s": 280e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_published_architectures_have_the_papers_parameter_counts(name):
    with torch.device("meta"):
        net = architectures.network_from_config(name)
    count = sum(p.numel() for p in net.parameters())
    assert count == pytest.approx(PAPER_PARAMETERS[name], rel=0.005)


def test_ncsnpp_cifar10_size():
    """NCSN++ at EDM's CIFAR-10 settings: about 56 M parameters, like DDPM++ (EDM Table 7)."""
    config = dict(architectures.EDM_ARCHITECTURES["edm-cifar10-32x32-cond-vp"][1], embedding_type="fourier",
                  encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
    with torch.device("meta"):
        count = sum(p.numel() for p in NETWORK_CLASSES["SongUNet"](**config).parameters())
    assert count == pytest.approx(56e6, rel=0.01)


@pytest.mark.parametrize("name", ["ddpmpp", "edm2"])
def test_model_directories_round_trip_through_load_denoiser_and_save_denoiser(name, tmp_path):
    denoiser = tiny_denoiser(name, {"kind": "vp"} if name == "ddpmpp" else None)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0]), torch.tensor([2, 1])
    with torch.no_grad():
        expected = denoiser(x, sigma, labels)
    save_edm_model(denoiser, tmp_path / "edm")
    loaded, info = load_denoiser(tmp_path / "edm")
    assert (info.num_classes, info.sample_shape, info.conditioning) == (4, (3, 8, 8), "class")
    save_denoiser(loaded, tmp_path / "fdistill", kind="generator", generator_sigma=80.0)
    again, again_info = load_denoiser(tmp_path / "fdistill")
    assert again_info.kind == "generator" and again.precond == denoiser.precond
    for model in (loaded, again):
        with torch.no_grad():
            torch.testing.assert_close(model(x, sigma, labels), expected)


def test_unsupported_network_class_fails_naming_it_and_the_supported_ones(tmp_path):
    save_edm_model(tiny_denoiser("adm"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, _class_name="UNet3000")))
    with pytest.raises(ValueError, match=r"'UNet3000' not supported; supported: \['DhariwalUNet', 'EDM2UNet', 'SongUNet'\]"):
        load_denoiser(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, precond={"kind": "flow"})))
    with pytest.raises(ValueError, match=r"kind must be one of \['edm', 'vp', 've'\], got 'flow'"):
        load_denoiser(tmp_path / "m")


def test_edm2_forced_weight_normalisation_only_in_training():
    denoiser = tiny_denoiser("edm2")
    weight = denoiser.net.out_conv.weight
    before = weight.detach().clone()
    denoiser(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.tensor([0]))
    assert torch.equal(weight, before)                               # inference leaves the weights alone
    denoiser.train()(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.tensor([0]))
    norms = weight.detach().flatten(1).norm(dim=1) / math.sqrt(weight[0].numel())
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)   # unit RMS per output channel


def test_rehearsal_rows_count_the_papers_teachers():
    """The real-size rehearsal of cifar10_ddo estimates its memory from the EDM DDPM++ teacher built from config:
    a trained target (fp32 weights, gradients, AdamW moments; no EMA) and a frozen reference."""
    from fdistill.rehearsal import GIB, REHEARSALS, estimate_gib

    with torch.device("meta"):
        params = sum(p.numel() for p in architectures.network_from_config("edm-cifar10-32x32-cond-vp").parameters())
    assert estimate_gib(REHEARSALS["cifar10_ddo"]) == pytest.approx(params * (16 + 4) / GIB)
    assert REHEARSALS["imagenet64_ddo"].architecture == "edm2-img64-s"
