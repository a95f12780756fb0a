"""The Stable Diffusion latent component (``fdistill.pipelines.StableDiffusionComponent``) on tiny models from config:
SDXL micro-conditioning, cacheable conditioning, latent shapes, and pipeline export with another UNet / scheduler."""
import pytest
import torch

from fdistill.latent_component import LatentDiffusionComponent
from fdistill.pipelines import StableDiffusionComponent, encode_prompts
from fdistill.tiny_sd import tiny_sd_components

SIZE = 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_implements_the_latent_component_interface():
    assert isinstance(StableDiffusionComponent(tiny_sd_components("sd15", image_size=SIZE), (SIZE, SIZE)),
                      LatentDiffusionComponent)


def test_sdxl_time_ids_default_to_the_resolution_and_follow_the_batch_when_given():
    sd = StableDiffusionComponent(tiny_sd_components("sdxl", image_size=SIZE), (SIZE, 2 * SIZE))
    captions = ["a red square", "a blue circle"]
    default = sd.conditioning(captions)["added_cond_kwargs"]["time_ids"]
    torch.testing.assert_close(default, torch.tensor([[SIZE, 2 * SIZE, 0, 0, SIZE, 2 * SIZE]] * 2).float())
    batch = {"caption": captions, "original_size": torch.tensor([[64, 48], [32, 40]]),
             "crop_top_left": torch.tensor([[3, 5], [0, 7]])}
    from_data = sd.conditioning(captions, batch)["added_cond_kwargs"]["time_ids"]
    torch.testing.assert_close(from_data, torch.tensor([[64, 48, 3, 5, SIZE, 2 * SIZE],
                                                        [32, 40, 0, 7, SIZE, 2 * SIZE]]).float())
    prompt_embeds, pooled = encode_prompts(sd.parts, captions)
    cond = sd.conditioning(captions, batch)
    torch.testing.assert_close(cond["encoder_hidden_states"], prompt_embeds)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cached_conditioning_rebuilds_the_same_unet_arguments(kind):
    sd = StableDiffusionComponent(tiny_sd_components(kind, image_size=SIZE), (SIZE, SIZE))
    cond = sd.conditioning(["a green cross"])
    tensors = sd.conditioning_tensors(cond)
    assert all(isinstance(value, torch.Tensor) for value in tensors.values())
    rebuilt = sd.conditioning_from_tensors({**tensors, "latents_w": torch.zeros(1)})
    assert rebuilt.keys() == cond.keys()
    torch.testing.assert_close(rebuilt, cond)


def test_latent_shape_matches_the_vae():
    sd = StableDiffusionComponent(tiny_sd_components("sd15", image_size=SIZE, vae_channels=(8, 16)), (SIZE, 2 * SIZE))
    latents = sd.encode(torch.zeros(3, 3, SIZE, 2 * SIZE))
    assert tuple(latents.shape) == sd.latent_shape(3) == (3, 4, SIZE // 2, SIZE)
    assert tuple(sd.decode(latents).shape) == (3, 3, SIZE, 2 * SIZE)


def test_save_pipeline_writes_the_given_unet_and_scheduler(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = tiny_sd_components("sd15", image_size=SIZE)
    sd = StableDiffusionComponent(parts, (SIZE, SIZE))
    tuned = tiny_sd_components("sd15", image_size=SIZE, seed=1).unet
    sd.save_pipeline(tmp_path / "pipe", tuned, DDIMScheduler.from_config(parts.scheduler.config))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    loaded, written = pipe.unet.state_dict(), tuned.state_dict()
    assert all(torch.equal(loaded[key], written[key]) for key in written)
    assert not torch.equal(loaded["conv_in.weight"], parts.unet.state_dict()["conv_in.weight"])


def test_sampling_denoiser_guides_with_the_empty_prompt():
    from fdistill.denoisers import ClassifierFreeGuidance, DiffusersDenoiser

    parts = tiny_sd_components("sd15", image_size=SIZE)
    sd = StableDiffusionComponent(parts, (SIZE, SIZE))
    guided = sd.sampling_denoiser(parts.unet, guidance=3.0)
    assert isinstance(guided, ClassifierFreeGuidance) and guided.scale == 3.0
    plain = sd.sampling_denoiser(parts.unet)
    assert isinstance(plain, DiffusersDenoiser)
    torch.testing.assert_close(plain.null_cond, sd.conditioning([""]))
    assert sd.denoiser(parts.unet).null_cond is None
