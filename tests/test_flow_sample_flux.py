"""``fdistill sample`` on a Flux pipeline directory (tiny Flux built from config, CPU): T5 + CLIP pooled prompts, the
embedded guidance and packed latents give FluxPipeline's images from the same latents and steps."""
import pytest
import torch

from fdistill.flow_pipelines import FluxComponent
from fdistill.tiny_flow import tiny_flux_components


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("guidance_embeds, options, pipeline_guidance", [
    (True, [], {"guidance_scale": 3.5}),                                     # FLUX.1-dev's default embedded guidance
    (True, ["--embedded-guidance", "2"], {"guidance_scale": 2.0}),
    (False, ["--guidance", "2"], {"true_cfg_scale": 2.0, "negative_prompt": ""}),    # classifier-free guidance
])
def test_sample_command_on_a_flux_directory_matches_flux_pipeline(guidance_embeds, options, pipeline_guidance,
                                                                  tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fdistill.commands.sample import image_noise, main
    from fdistill.denoisers import load_denoiser
    from fdistill.denoisers.flow import pack_latents
    from fdistill.images import load_images
    from fdistill.samplers import SamplerConfig, noise_levels

    parts = tiny_flux_components(image_size=8, guidance_embeds=guidance_embeds)
    FluxComponent(parts, (8, 8), max_sequence_length=16).save_pipeline(tmp_path / "flux")
    assert main(["--model", str(tmp_path / "flux"), "--prompt", "a red square", "--num", "1", "--solver", "euler",
                 "--steps", "3", "--schedule", "time_uniform", "--out", str(tmp_path / "gen"), "--no-progress",
                 *options]) == 0

    denoiser, _ = load_denoiser(tmp_path / "flux")
    assert denoiser.sample_shape == (4, 128, 128)                    # FluxPipeline's default size (1024 px at f 8)
    levels = noise_levels(SamplerConfig(solver="euler", steps=3, schedule="time_uniform"), denoiser)
    times = (levels / (1 + levels))[:-1].tolist()
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux")
    # our times already carry Flux's resolution shift mu: the pipeline must not shift them again
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift=1.0)
    z = image_noise(0, 0, 1, (4, 128, 128))
    images = pipe(["a red square"], latents=pack_latents(times[0] * z), sigmas=times, output_type="pt",
                  max_sequence_length=512, **pipeline_guidance).images
    written = load_images(tmp_path / "gen", "000000.png")                         # [-1, 1]
    assert written.shape == images.shape == (1, 3, 128, 128)
    torch.testing.assert_close((written + 1) / 2, images, atol=2.5 / 255, rtol=0)
    unguided = {"guidance_scale": 7.0} if guidance_embeds else {}       # the guidance changes the images
    other = pipe(["a red square"], latents=pack_latents(times[0] * z), sigmas=times, output_type="pt",
                 max_sequence_length=512, **unguided).images
    assert (other - images).abs().max() > 5 / 255
