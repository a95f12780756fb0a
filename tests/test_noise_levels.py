"""``fdistill.samplers.noise_levels``: one place turns a sampler config into noise levels for a denoiser, so methods'
sample grids, DDO's fakes and ``fdistill sample`` use the same levels (time_uniform of a Diffusers model: uniform in
ITS timesteps)."""
import pytest
import torch
from diffusers import DDPMScheduler

from fdistill import samplers
from fdistill.commands import sample as sample_command
from fdistill.denoisers import ClassifierFreeGuidance, save_denoiser
from fdistill.denoisers.diffusers import DiffusersDenoiser
from fdistill.methods.ddo import sample_with
from fdistill.methods.denoising import Denoising, DenoisingConfig
from fdistill.networks import build_unet, tiny_unet
from fdistill.samplers import SamplerConfig, noise_levels

STEPS = 5


def diffusers_denoiser() -> DiffusersDenoiser:
    """A tiny UNet2DModel built from config with Stable Diffusion's DDPMScheduler (1000 steps, scaled-linear betas)."""
    torch.manual_seed(0)
    unet = build_unet(8, 1, (8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser(unet, scheduler)


def levels_used_by(run, monkeypatch) -> list[torch.Tensor]:
    """The sigmas every ``fdistill.samplers.sample`` call receives while ``run()`` runs (the sampler itself is skipped:
    it returns its input noise)."""
    used = []
    monkeypatch.setattr(samplers, "sample", lambda denoiser, noise, sigmas, **options: used.append(sigmas.cpu()) or noise)
    run()
    return used


def test_time_uniform_of_method_sampling_equals_fdistill_sample_for_a_diffusers_model(tmp_path, monkeypatch):
    denoiser = diffusers_denoiser()
    sampler = SamplerConfig(steps=STEPS, schedule="time_uniform")
    method = Denoising(DenoisingConfig(sampler=sampler), denoiser, (1, 8, 8))
    used = levels_used_by(lambda: (method.generate(2, torch.Generator().manual_seed(0)),
                                   sample_with(denoiser, 2, (1, 8, 8), sampler)), monkeypatch)

    save_denoiser(denoiser, tmp_path / "model")
    model = sample_command.load_model(str(tmp_path / "model"), torch.float32, "cpu")
    args = sample_command.build_parser().parse_args(["--model", str(tmp_path / "model"), "--schedule", "time_uniform",
                                                     "--steps", str(STEPS), "--out", str(tmp_path / "out")])
    command = sample_command.noise_levels(model, args)
    assert len(used) == 2
    for levels in used:                                    # the method's grid and DDO's fakes
        torch.testing.assert_close(levels, command, rtol=1e-12, atol=0)
    # uniform in the model's own (fractional) timestep index, from t = 999 down to t = 0
    timesteps = denoiser.schedule.timestep(command[:-1]).double()
    torch.testing.assert_close(timesteps, torch.linspace(999, 0, STEPS, dtype=torch.float64), rtol=0, atol=1e-3)
    # ... which is not the continuous VP-SDE's t that the methods used before
    continuous = samplers.sigmas("time_uniform", STEPS, denoiser.sigma_min, denoiser.sigma_max)
    assert (continuous[1:-1].log() - command[1:-1].log()).abs().max() > 0.05


def test_range_comes_from_the_config_then_the_model_through_wrappers_then_edm():
    denoiser = tiny_unet(sigma_data=0.5)
    denoiser.sigma_min, denoiser.sigma_max = 0.01, 20.0
    guided = ClassifierFreeGuidance(denoiser, 2.0, None)
    from_model = noise_levels(SamplerConfig(steps=STEPS), guided)
    assert from_model[0].item() == pytest.approx(20.0) and from_model[-2].item() == pytest.approx(0.01)
    from_config = noise_levels(SamplerConfig(steps=STEPS, sigma_min=0.1, sigma_max=5.0), guided)
    assert from_config[0].item() == pytest.approx(5.0) and from_config[-2].item() == pytest.approx(0.1)
    edm = noise_levels(SamplerConfig(steps=STEPS), lambda x, sigma, cond=None: x)
    torch.testing.assert_close(edm, samplers.sigmas("karras", STEPS, 0.002, 80.0), rtol=0, atol=0)
    assert edm.dtype == torch.float64 and edm[-1] == 0 and len(edm) == STEPS + 1
