"""Rectified-flow teachers (SD3) behind the denoiser protocol, on a tiny SD3 built from config, offline, CPU."""
import numpy as np
import pytest
import torch

from fdistill.denoisers import DiffusersDenoiser, load_denoiser
from fdistill.flow_pipelines import StableDiffusion3Component
from fdistill.tiny_flow import tiny_sd3_components
from fdistill.samplers import sample

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd3():
    parts = tiny_sd3_components(image_size=8)
    return parts, StableDiffusion3Component(parts, (8, 8), max_sequence_length=8)


def test_x0_equals_the_schedulers_own_euler_step_to_zero(sd3):
    parts, component = sd3
    denoiser = component.denoiser(parts.transformer)
    cond = component.conditioning(PROMPTS)
    scheduler = parts.scheduler
    scheduler.set_timesteps(10)
    time = scheduler.sigmas[3]
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        velocity = parts.transformer(hidden_states=x_t, timestep=scheduler.timesteps[3].expand(2),
                                     encoder_hidden_states=cond["encoder_hidden_states"],
                                     pooled_projections=cond["pooled_projections"]).sample
        scheduler._step_index = 3          # one Euler step from t to 0: x_t + (0 - t) v, the scheduler's x0
        scheduler.sigmas[4] = 0.0
        expected = scheduler.step(velocity, scheduler.timesteps[3], x_t).prev_sample
        sigma = time / (1 - time)
        x0 = denoiser(x_t / (1 - time), sigma.expand(2), cond)
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)


def test_euler_sampling_reproduces_flow_match_euler_steps(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts, component = sd3
    denoiser = component.denoiser(parts.transformer)
    cond = component.conditioning(PROMPTS)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(0.98, 0.1, 6))        # shifted by the scheduler (shift 3)
    times = scheduler.sigmas.double()                                # [7], last 0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t = times[0].float() * z                                       # the same start in both units
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            velocity = parts.transformer(hidden_states=x_t, timestep=timestep.expand(2),
                                         encoder_hidden_states=cond["encoder_hidden_states"],
                                         pooled_projections=cond["pooled_projections"]).sample
            x_t = scheduler.step(velocity, timestep, x_t).prev_sample
        sigmas = times / (1 - times)
        ours = sample(denoiser, float(sigmas[0]) * z, sigmas, solver="euler", cond=cond)   # x = x_t / (1 - t)
    torch.testing.assert_close(ours, x_t, atol=1e-4, rtol=1e-4)


def test_schedule_follows_the_shift_and_sample_command_matches_the_pipeline(sd3, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from fdistill.commands.sample import main
    from fdistill.images import load_images

    parts, component = sd3
    denoiser = component.denoiser(parts.transformer)
    top = 3 * 0.999 / (1 + 2 * 0.999)                                # SD3 shift 3 of t = (T - 1) / T
    assert denoiser.sigma_max == pytest.approx(top / (1 - top))
    assert denoiser.sigma_min == pytest.approx(0.003 / 1.002 / (1 - 0.003 / 1.002))
    component.save_pipeline(tmp_path / "sd3")
    loaded, info = load_denoiser(tmp_path / "sd3")
    assert (info.conditioning, info.sample_shape) == ("text", (4, 8, 8)) and loaded.flow
    assert main(["--model", str(tmp_path / "sd3"), "--prompt", "a red square", "--num", "2", "--solver", "euler",
                 "--steps", "4", "--schedule", "time_uniform", "--out", str(tmp_path / "gen"),
                 "--no-progress"]) == 0
    from fdistill.commands.sample import image_noise
    from fdistill.samplers import SamplerConfig, noise_levels

    levels = noise_levels(SamplerConfig(solver="euler", steps=4, schedule="time_uniform"), loaded)
    times = (levels / (1 + levels))[:-1].tolist()
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    z = image_noise(0, 0, 2, (4, 8, 8))
    images = pipe(["a red square"] * 2, latents=times[0] * z, sigmas=times, guidance_scale=1.0,
                  max_sequence_length=256, output_type="pt").images                 # [2, 3, 8, 8] in [0, 1]
    written = load_images(tmp_path / "gen", "00000[01].png")                    # [-1, 1]
    torch.testing.assert_close((written + 1) / 2, images, atol=2.5 / 255, rtol=0)


def test_unsupported_scheduler_and_model_fail_naming_what_is_supported(sd3):
    from diffusers import DDPMScheduler, UNet2DModel

    parts, _ = sd3
    with pytest.raises(ValueError, match="SD3Transformer2DModel with scheduler 'DDPMScheduler'.*FlowMatchEuler"):
        DiffusersDenoiser(parts.transformer, DDPMScheduler())
    with pytest.raises(ValueError, match="scheduler 'MadeUpScheduler' not supported; supported: .*FlowMatchEuler"):
        DiffusersDenoiser(parts.transformer, {"_class_name": "MadeUpScheduler"})
    with pytest.raises(TypeError, match="unsupported model class Linear; supported: .*SD3Transformer2DModel"):
        DiffusersDenoiser(torch.nn.Linear(2, 2), parts.scheduler)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)
    with pytest.raises(ValueError, match="UNet2DModel with scheduler 'FlowMatchEulerDiscreteScheduler'"):
        DiffusersDenoiser(unet, parts.scheduler)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 2, 2))


def test_flux_x0_matches_the_scheduler_with_its_resolution_dependent_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fdistill.denoisers.flow import flux_mu, image_ids, pack_latents, unpack_latents

    net = _tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = flux_mu(16, scheduler.config)                     # 8 x 8 latents -> 4 x 4 packed tokens
    denoiser = DiffusersDenoiser(net, scheduler, mu=mu)
    top = np.exp(mu) / (np.exp(mu) + 1 / 0.999 - 1)
    assert denoiser.sigma_max == pytest.approx(top / (1 - top)) and denoiser.sample_shape[0] == 4
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 8))
    flux_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 8, latents.device), flux_ids)
    assert torch.equal(unpack_latents(pack_latents(latents), 8, 8), latents)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "pooled_projections": torch.randn(2, 32),
            "guidance": torch.full((2,), 3.5)}
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
    time, timestep = scheduler.sigmas[1], scheduler.timesteps[1]
    with torch.no_grad():
        velocity = net(hidden_states=pack_latents(latents), timestep=(timestep / 1000).expand(2),
                       guidance=cond["guidance"], pooled_projections=cond["pooled_projections"],
                       encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=torch.zeros(5, 3),
                       img_ids=image_ids(8, 8, latents.device)).sample
        scheduler._step_index = 1
        scheduler.sigmas[2] = 0.0
        expected = scheduler.step(unpack_latents(velocity, 8, 8), timestep, latents).prev_sample
        x0 = denoiser(latents / (1 - time), (time / (1 - time)).expand(2), cond)
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)


def test_a_flux_denoiser_without_mu_uses_the_shift_at_1024_px():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fdistill.denoisers.flow import flux_mu

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    assert flux_mu(4096, scheduler.config) == pytest.approx(1.15)
    default = DiffusersDenoiser(_tiny_flux(), scheduler)
    assert default.sigma_max == pytest.approx(DiffusersDenoiser(_tiny_flux(), scheduler, mu=1.15).sigma_max)
    assert default.sigma_max > DiffusersDenoiser(_tiny_flux(), scheduler, mu=0.5).sigma_max


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fid_command_samples_a_flow_pipeline_on_a_prompt_file(kind, sd3, tmp_path):
    """``fdistill fid --prompts`` on an SD3 / Flux directory: one image per prompt through fdistill sample's encoding."""
    import json

    from fdistill.cli import main as cli
    from fdistill.flow_pipelines import FluxComponent
    from fdistill.tiny_flow import tiny_flux_components

    component = sd3[1] if kind == "sd3" else FluxComponent(tiny_flux_components(image_size=8), (8, 8),
                                                               max_sequence_length=16)
    component.save_pipeline(tmp_path / kind)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green cross\na yellow shape\n")
    out = tmp_path / "fid.json"
    assert cli(["fid", "--gen", str(tmp_path / kind), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                "--solver", "euler", "--ref", "digits", "--features", "digits", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_gen"] == 4 and np.isfinite(result["fid"])


def test_a_model_directory_with_an_unknown_scheduler_or_class_fails_at_load_naming_both(sd3, tmp_path):
    import json

    parts, component = sd3
    component.save_pipeline(tmp_path / "sd3")
    config_path = tmp_path / "sd3" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "FooScheduler"}))
    with pytest.raises(ValueError, match="scheduler 'FooScheduler' not supported; supported: .*FlowMatchEuler"):
        load_denoiser(tmp_path / "sd3")
    index_path = tmp_path / "sd3" / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "transformer": ["diffusers", "HunyuanDiT2DModel"]}))
    with pytest.raises(ValueError, match="model class 'HunyuanDiT2DModel' not supported; allowed: .*SD3Transformer"):
        load_denoiser(tmp_path / "sd3")
