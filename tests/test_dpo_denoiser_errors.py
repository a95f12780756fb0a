"""Diffusion-DPO's per-sample errors, computed through the denoiser protocol (a weighted x0 loss at sigma(t)), equal
the paper's errors computed in the scheduler's own space: ||eps_theta(x_t, t) - eps||^2 for an epsilon model,
||v_theta(x_t, t) - v||^2 for a v-prediction model (Wallace et al. 2023, Eq. 14; Salimans & Ho 2022, Sec. 4)."""
import pytest
import torch
from diffusers import DDPMScheduler

from fdistill.data.preference import shape_preferences
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training.config import SamplerConfig

SIZE = 8


def _errors_in_scheduler_space(unet, scheduler, latents, cond, generator, pairs):
    """The errors as the released Diffusion-DPO code computes them: one timestep and noise per pair (same draw
    order as the method), x_t = scheduler.add_noise, regression target of the scheduler's prediction_type."""
    batch = latents.shape[0] // pairs
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).repeat(pairs)
    noise = torch.randn(latents[:batch].shape, generator=generator).repeat(pairs, 1, 1, 1)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                timesteps)
    stacked = {key: torch.cat([value] * pairs) for key, value in cond.items()}
    with torch.no_grad():
        prediction = unet(noisy, timesteps, **stacked).sample
    return (prediction - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_errors_equal_the_scheduler_space_errors(prediction_type):
    torch.set_num_threads(1)
    components = tiny_sd_components("sd15", image_size=SIZE)
    components.scheduler = DDPMScheduler.from_config(components.scheduler.config, prediction_type=prediction_type)
    data = shape_preferences(num_pairs=8, resolution=SIZE)
    config = DiffusionDPOConfig(finetune="full", beta=1000.0, sampler=SamplerConfig(steps=2, guidance=1.0))
    method = build(config, components, data)
    with torch.no_grad():                       # a tuned model that differs from the reference
        for p in method.networks["unet"].parameters():
            p.add_(0.02 * torch.randn_like(p))
    encoded = method.encode_batch(next(data.loader(8)))
    errors = method.errors(encoded, torch.Generator().manual_seed(5), pairs=True)
    latents = torch.cat([encoded["latents_w"], encoded["latents_l"]])
    for name, unet in (("model", method.networks["unet"]), ("ref", method.frozen["reference"])):
        expected = _errors_in_scheduler_space(unet, components.scheduler, latents, encoded["cond"],
                                              torch.Generator().manual_seed(5), pairs=2)
        torch.testing.assert_close(torch.cat([errors[f"{name}_w"], errors[f"{name}_l"]]), expected,
                                   rtol=1e-5, atol=0)
    model_diff = errors["model_w"] - errors["model_l"]
    assert (model_diff - (errors["ref_w"] - errors["ref_l"])).abs().max() > 1e-4     # model and reference differ
