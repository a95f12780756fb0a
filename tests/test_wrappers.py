"""DiffusersDenoiser: x0 of UNet2DModel / UNet2DConditionModel (+SDXL) / DiT against Diffusers' own schedulers."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from factories import TEXT_DIM, tiny_dit, tiny_unet2d, tiny_unet2d_condition

from fdistill.denoisers import ClassifierFreeGuidance, DiffusersDenoiser, VPSchedule
from fdistill.samplers import sample

TOKENS = 3


def text_cond(batch: int, sdxl: bool = False):
    states = torch.randn(batch, TOKENS, TEXT_DIM)
    if not sdxl:
        return states
    return {"encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, TEXT_DIM),
                                  "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).expand(batch, 6)}}


def to_double(cond):
    """Float conditions in float64, to match a float64 network in raw (unwrapped) calls."""
    if isinstance(cond, dict):
        return {key: to_double(value) for key, value in cond.items()}
    return cond.double() if isinstance(cond, torch.Tensor) and cond.is_floating_point() else cond


# name -> (model factory, condition factory(batch), variance_type of the matching DDPMScheduler)
MODELS = {
    "unet2d": (tiny_unet2d, lambda b: None, "fixed_small"),
    "unet2d_class": (lambda: tiny_unet2d(num_class_embeds=4), lambda b: torch.arange(b) % 3, "fixed_small"),
    "unet2d_learned_sigma": (lambda: tiny_unet2d(out_channels=4), lambda b: None, "learned_range"),
    "unet2d_condition": (tiny_unet2d_condition, text_cond, "fixed_small"),
    "unet2d_condition_sdxl": (lambda: tiny_unet2d_condition(sdxl=True), lambda b: text_cond(b, True), "fixed_small"),
    "dit": (tiny_dit, lambda b: torch.arange(b) % 5, "learned_range"),
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def raw_call(net, x_vp, timestep, cond):
    """Call the diffusers model the way its pipelines do (integer timesteps)."""
    if isinstance(net, UNet2DConditionModel):
        cond = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        return net(x_vp, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                   added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    if isinstance(net, DiTTransformer2DModel):
        return net(x_vp, timestep=timestep, class_labels=cond).sample
    return net(x_vp, timestep, class_labels=cond).sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_x0_matches_ddpm_scheduler_at_grid_timesteps(model_name, prediction_type):
    make_model, make_cond, variance_type = MODELS[model_name]
    net = make_model().double().eval()
    beta_schedule = BETA_SCHEDULES[zlib.crc32((model_name + prediction_type).encode()) % 3]   # all schedules covered
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                              variance_type=variance_type)
    scheduler.set_timesteps(1000)
    denoiser = DiffusersDenoiser(net, scheduler)
    for t in (0, 37, 999):
        x_vp = torch.randn(3, 2, 8, 8, dtype=torch.float64)
        cond = to_double(make_cond(3))
        with torch.no_grad():
            expected = scheduler.step(raw_call(net, x_vp, torch.full((3,), t), cond), t, x_vp).pred_original_sample
            sigma = denoiser.schedule.sigma_at(torch.full((3,), t))
            x0 = denoiser(x_vp * torch.sqrt(1 + sigma ** 2)[:, None, None, None], sigma, cond)
        assert x0.dtype == torch.float64
        torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-6 * (1 + sigma.max().item()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_scheduler_equals_dpm_solver_1(prediction_type):
    """DDIM (eta = 0, set_alpha_to_one) through Diffusers == fdistill's dpm_solver_1 on the same sigmas."""
    net = tiny_unet2d(num_class_embeds=4).double().eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    denoiser = DiffusersDenoiser(net, scheduler)
    labels = torch.tensor([0, 1, 2, 0])
    x_vp = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    sample_vp = x_vp.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = raw_call(net, sample_vp, t.expand(4), labels)
            sample_vp = scheduler.step(output, t, sample_vp, eta=0.0).prev_sample
    sigmas = torch.cat([denoiser.schedule.sigma_at(scheduler.timesteps), torch.zeros(1, dtype=torch.float64)])
    ours = sample(denoiser, x_vp * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, solver="dpm_solver_1", cond=labels)
    torch.testing.assert_close(ours, sample_vp, rtol=1e-5, atol=1e-5)


def test_v_prediction_formula_on_exact_velocity():
    """An oracle network that outputs the true v = alpha eps - s x0 gives back x0 exactly (fp64)."""
    x0, eps = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    denoiser = DiffusersDenoiser(tiny_unet2d().double(), DDPMScheduler(prediction_type="v_prediction"))
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    alpha = (1 / torch.sqrt(1 + sigma ** 2))[:, None, None, None]
    s = sigma[:, None, None, None] * alpha
    denoiser.net.forward = lambda *a, **k: type("Out", (), {"sample": alpha * eps - s * x0})()
    torch.testing.assert_close(denoiser(x0 + sigma[:, None, None, None] * eps, sigma), x0, rtol=0, atol=1e-12)


def test_sigma_to_timestep_is_log_linear_and_clamped():
    schedule = VPSchedule(DDPMScheduler(beta_schedule="linear").alphas_cumprod)
    grid = torch.tensor([0, 10, 999])
    torch.testing.assert_close(schedule.timestep(schedule.sigma_at(grid)), grid.float())
    midpoint = (0.5 * (schedule.log_sigmas[10] + schedule.log_sigmas[11])).exp()
    assert schedule.timestep(midpoint[None]).item() == pytest.approx(10.5, abs=1e-5)
    assert schedule.timestep(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    assert schedule.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-4)   # abar is float32
    assert schedule.sigma_max > 100


def test_fractional_timesteps_reach_the_network_as_float():
    net = tiny_unet2d()
    seen = []
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[1]), with_kwargs=True)
    denoiser = DiffusersDenoiser(net, DDPMScheduler())
    denoiser(torch.randn(1, 2, 8, 8), (0.5 * (denoiser.schedule.log_sigmas[20] + denoiser.schedule.log_sigmas[21])).exp())
    assert seen[0].dtype == torch.float32 and seen[0].item() == pytest.approx(20.5, abs=1e-4)


def test_null_conditions_and_guidance():
    dit = DiffusersDenoiser(tiny_dit(num_classes=5), DDPMScheduler())
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0])
    assert dit.uncond(torch.tensor([1, 3])).tolist() == [5, 5]
    torch.testing.assert_close(dit(x, sigma), dit(x, sigma, torch.tensor([5, 5])))
    guided = ClassifierFreeGuidance(dit, 3.0, uncond=dit.uncond)
    cond, null = dit(x, sigma, torch.tensor([1, 3])), dit(x, sigma, torch.tensor([5, 5]))
    torch.testing.assert_close(guided(x, sigma, torch.tensor([1, 3])), null + 3 * (cond - null))

    sdxl = DiffusersDenoiser(tiny_unet2d_condition(sdxl=True), DDPMScheduler())
    cond = text_cond(2, sdxl=True)
    with pytest.raises(ValueError, match="null_cond"):
        sdxl.uncond(cond)
    sdxl.null_cond = {"encoder_hidden_states": torch.zeros(1, TOKENS, TEXT_DIM),
                      "added_cond_kwargs": {"text_embeds": torch.zeros(1, TEXT_DIM)}}
    null = sdxl.uncond(cond)
    assert null["encoder_hidden_states"].shape == (2, TOKENS, TEXT_DIM)
    assert null["added_cond_kwargs"]["text_embeds"].shape == (2, TEXT_DIM)
    assert torch.equal(null["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])
    assert torch.isfinite(ClassifierFreeGuidance(sdxl, 5.0, uncond=sdxl.uncond)(x, sigma, cond)).all()


@pytest.mark.parametrize("model_name, shape", [("unet2d", (2, 8, 4, 4)), ("unet2d_condition", (2, 8, 4, 4)),
                                                ("dit", (2, 16, 8))])
def test_features_default_block_and_gradients(model_name, shape):
    make_model, make_cond, _ = MODELS[model_name]
    denoiser = DiffusersDenoiser(make_model(), DDPMScheduler())
    x, sigma, cond = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 3.0]), make_cond(2)
    x0, features = denoiser.x0_and_features(x, sigma, cond)
    assert features.shape == shape
    torch.testing.assert_close(x0, denoiser(x, sigma, cond))
    torch.testing.assert_close(denoiser.features(x, sigma, cond), features)
    features.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.net.parameters())


def test_features_of_a_chosen_block_and_bad_block_name():
    denoiser = DiffusersDenoiser(tiny_unet2d(), DDPMScheduler(), feature_block="down_blocks.0")
    assert denoiser.features(torch.randn(1, 2, 8, 8), 1.0).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="feature_block 'nope'.*top-level blocks"):
        DiffusersDenoiser(tiny_unet2d(), DDPMScheduler(), feature_block="nope").features(torch.randn(1, 2, 8, 8), 1.0)


def test_low_precision_network_keeps_float32_io():
    net = tiny_unet2d()
    reference = DiffusersDenoiser(net, DDPMScheduler())
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 3.0])
    expected = reference(x, sigma)
    low = DiffusersDenoiser(tiny_unet2d(), DDPMScheduler(), dtype=torch.bfloat16)
    low.net.load_state_dict(net.state_dict())
    out = low(x, sigma)
    assert out.dtype == torch.float32 and low.net.dtype == torch.bfloat16
    assert (out - expected).abs().max() < 0.1 * (1 + expected.abs().max())


def test_bad_prediction_type_and_model_class():
    with pytest.raises(ValueError, match="prediction_type 'flow'.*allowed"):
        DiffusersDenoiser(tiny_unet2d(), {"prediction_type": "flow"})
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        DiffusersDenoiser(torch.nn.Linear(2, 2), DDPMScheduler())
