"""Model directories: save_denoiser / load_denoiser round trips, Diffusers pipelines and bare models, errors."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from fdistill.denoisers import ClassifierFreeGuidance, DiffusersDenoiser, load_denoiser, save_denoiser
from fdistill.networks import MLPDenoiser, tiny_unet


def assert_same_outputs(actual, expected):
    """Outputs of a reloaded model: bitwise-equal weights can still give outputs that differ in the last bits (other
    kernels, e.g. AVX-512 vs AVX2, or other memory alignment), so outputs are compared to float32 precision."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_edm_generator_round_trip_and_plain_diffusers_load(tmp_path):
    denoiser = tiny_unet(num_classes=3)
    save_denoiser(denoiser, tmp_path / "gen", kind="generator", generator_sigma=2.5)
    loaded, info = load_denoiser(tmp_path / "gen")
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 2])
    assert_same_outputs(loaded(x, sigma, labels), denoiser(x, sigma, labels))
    assert_same_outputs(loaded(x, sigma), denoiser(x, sigma))                # null class
    assert (info.kind, info.generator_sigma, info.sample_shape) == ("generator", 2.5, (1, 8, 8))
    assert (info.num_classes, info.conditioning, info.wrapper) == (3, "class", "edm")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    plain = UNet2DModel.from_pretrained(tmp_path / "gen", subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), denoiser.net.state_dict().values()))
    assert (tmp_path / "gen" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_mlp_round_trip(tmp_path):
    denoiser = MLPDenoiser(dim=2, hidden=16, depth=3, num_classes=2, sigma_data=0.8)
    torch.nn.init.normal_(denoiser.net.output[-1].weight)
    save_denoiser(denoiser, tmp_path / "mlp")
    loaded, info = load_denoiser(tmp_path / "mlp")
    x, sigma = torch.randn(4, 2), torch.rand(4) + 0.1
    assert_same_outputs(loaded(x, sigma, torch.tensor([0, 1, 0, 1])), denoiser(x, sigma, torch.tensor([0, 1, 0, 1])))
    assert loaded.sigma_data == 0.8 and loaded.feature_block == "blocks.1" and info.sample_shape == (2,)


def test_vp_round_trip_keeps_scheduler_and_learned_sigma(tmp_path):
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4,
                                num_layers=2, norm_num_groups=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    denoiser = DiffusersDenoiser(net, scheduler).eval()
    save_denoiser(denoiser, tmp_path / "dit")
    loaded, info = load_denoiser(tmp_path / "dit")
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 30.0]), torch.tensor([1, 4])
    torch.testing.assert_close(loaded(x, sigma, labels), denoiser(x, sigma, labels), rtol=0, atol=1e-6)
    assert loaded.prediction_type == "v_prediction" and info.num_classes == 5 and info.wrapper == "vp"
    assert info.sigma_max == pytest.approx(denoiser.sigma_max)
    config = json.loads((tmp_path / "dit" / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "squaredcos_cap_v2"


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model"
    first = tiny_unet()
    save_denoiser(first, target)
    second = tiny_unet()
    save_denoiser(second, target)                                          # replaces a complete directory
    x = torch.randn(1, 1, 8, 8)

    def assert_is_second(directory):
        """The directory holds ``second``: its weights bitwise, and so its outputs (to float32 precision)."""
        loaded = load_denoiser(directory)[0]
        assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), second.net.state_dict().values()))
        assert_same_outputs(loaded(x, 1.0), second(x, 1.0))

    assert_is_second(target)
    assert (load_denoiser(target)[0](x, 1.0) - first(x, 1.0)).abs().max() > 1e-3     # not the first model

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(type(first.net), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_denoiser(first, target)
    assert_is_second(target)                                                 # old model intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]           # no staging leftovers


def test_diffusers_pipeline_directory(tmp_path):
    from fdistill.pipelines import save_components
    from fdistill.tiny_sd import tiny_sd_components

    components = tiny_sd_components("sd15")
    save_components(components, str(tmp_path / "sd"))
    loaded, info = load_denoiser(tmp_path / "sd")
    direct = DiffusersDenoiser(components.unet, components.scheduler)
    x, sigma, text = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 5.0]), torch.randn(2, 16, 32)
    torch.testing.assert_close(loaded(x, sigma, text), direct(x, sigma, text))
    assert info.conditioning == "text" and info.sample_shape == (4, 16, 16)
    assert {"vae", "text_encoder", "tokenizer"} <= set(info.components)
    assert info.components["vae"] == (str(tmp_path / "sd"), "vae")


def test_bare_model_directory_with_scheduler(tmp_path):
    net = tiny_unet().net
    net.save_pretrained(tmp_path / "repo" / "unet")
    DDPMScheduler(prediction_type="sample").save_pretrained(tmp_path / "repo" / "scheduler")
    by_subfolder, _ = load_denoiser(tmp_path / "repo", subfolder="unet")
    by_path, info = load_denoiser(tmp_path / "repo" / "unet")
    x = torch.randn(1, 1, 8, 8)
    assert by_subfolder.prediction_type == "sample" and torch.allclose(by_subfolder(x, 1.0), by_path(x, 1.0),
                                                                                rtol=1e-5, atol=1e-6)
    assert info.wrapper == "vp"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_denoiser(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected fdistill.json.*model_index.json.*config.json"):
        load_denoiser(tmp_path / "empty")
    (tmp_path / "lonely").mkdir()
    tiny_unet().net.save_pretrained(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match="needs its scheduler"):
        load_denoiser(tmp_path / "lonely")
    with pytest.raises(ValueError, match="kind must be one of"):
        save_denoiser(tiny_unet(), tmp_path / "x", kind="student")
    with pytest.raises(ValueError, match="generator_sigma > 0"):
        save_denoiser(tiny_unet(), tmp_path / "x", kind="generator")
    with pytest.raises(TypeError, match="cannot save a ClassifierFreeGuidance"):
        save_denoiser(ClassifierFreeGuidance(tiny_unet(), 2.0, None), tmp_path / "x")


def test_hub_id_offline_is_a_file_not_found_error_naming_the_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError(f"cannot reach the hub for {repo_id}/{filename}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="'owner/model' is not a local path.*Hugging Face hub"):
        load_denoiser("owner/model")
