"""A Diffusion-DPO LoRA export names its base pipeline, and loads on it (``load_denoiser`` / ``fdistill sample``)."""
import json

import pytest
import torch

from fdistill.data.preference import shape_preferences
from fdistill.denoisers import load_denoiser
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build
from fdistill.pipelines import load_sd_components, save_components
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training.config import SamplerConfig

SIZE = 8


@pytest.fixture
def lora_export(tmp_path):
    """A tiny SD pipeline saved as the base, a LoRA DPO method on it with perturbed adapters, exported."""
    torch.set_num_threads(1)
    base = tmp_path / "base"
    save_components(tiny_sd_components("sd15", image_size=SIZE), str(base))
    config = DiffusionDPOConfig(finetune="lora", lora_rank=2, lora_alpha=8.0, sampler=SamplerConfig(steps=2))
    method = build(config, load_sd_components(str(base)), shape_preferences(num_pairs=4, resolution=SIZE))
    for p in method.networks["unet"].parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    method.export(tmp_path / "model")
    return base, tmp_path / "model", method


def test_lora_export_records_its_base_and_loads_on_it(lora_export):
    base, export, method = lora_export
    assert json.loads((export / "fdistill_dpo.json").read_text())["base_model"] == str(base)
    denoiser, info = load_denoiser(export)
    assert info.base_model == str(base) and info.conditioning == "text" and "vae" in info.components
    x, t = torch.randn(2, 4, SIZE, SIZE), torch.tensor([10, 900])
    cond = method.text_conditioning(["a red square", "a green cross"])
    with torch.no_grad():
        tuned = method.networks["unet"](x, t, **cond).sample
        loaded = denoiser.net(x, t, **cond).sample
        plain = load_denoiser(base)[0].net(x, t, **cond).sample
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)
    assert (plain - tuned).abs().max() > 1e-3             # the LoRA changed the model: the check above has teeth


def test_sample_command_runs_a_lora_export(lora_export, tmp_path):
    from fdistill.commands.sample import main

    _, export, _ = lora_export
    out = tmp_path / "samples"
    assert main(["--model", str(export), "--prompt", "a red square", "--num", "2", "--steps", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) >= 2


def test_a_local_base_is_recorded_absolute(tmp_path, monkeypatch):
    save_components(tiny_sd_components("sd15", image_size=SIZE), str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    assert load_sd_components("base").source == str((tmp_path / "base").resolve())
    assert load_sd_components(str(tmp_path / "base")).source == str((tmp_path / "base").resolve())


def test_lora_export_without_base_names_the_file(tmp_path):
    config = DiffusionDPOConfig(finetune="lora", sampler=SamplerConfig(steps=2))
    method = build(config, tiny_sd_components("sd15", image_size=SIZE), shape_preferences(num_pairs=4, resolution=SIZE))
    method.export(tmp_path / "model")
    with pytest.raises(ValueError, match="fdistill_dpo.json: the LoRA export names no base_model"):
        load_denoiser(tmp_path / "model")
