"""Text-to-image f-distill (SD1.5 / SDXL layouts) on a tiny Stable Diffusion built from config, offline, CPU."""
import json
import math

import pytest
import torch

from fdistill.config import build_run, compose
from fdistill.data import captioned_shapes, hf_images, prompt_file
from fdistill.denoisers import load_denoiser
from fdistill.methods.base import StepContext
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.pipelines import encode_latents, encode_prompts
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training import Trainer

SHRINK = ["model=tiny_sd", "data=captioned_shapes", "data.num_images=16", "data.resolution=16", "train.steps=2", "train.batch_size=4",
          "train.device=cpu", "train.progress=false", "train.sample_every=2", "train.num_samples=4",
          "train.checkpoint_every=2", "train.mixed_precision=no", "method.student_update_freq=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("experiment, kind", [("sd15_fdistill", "sd15"), ("sdxl_fdistill", "sdxl")])
def test_recipes_train_two_steps_and_export_a_one_step_diffusers_pipeline(experiment, kind, tmp_path):
    spec = compose([f"experiment={experiment}", *SHRINK, f"model.kind={kind}", f"train.run_dir={tmp_path}"])
    run = build_run(spec, with_loggers=False)
    method = run.method
    assert type(method.domain).__name__ == "TextToImageDomain" and method.domain.kind == kind
    trained = {name: _snapshot(net) for name, net in method.networks.items()}
    frozen = {name: _snapshot(net) for name, net in method.frozen.items()}
    trainer = Trainer(method, run.data, spec.train)
    trainer.fit()
    for name, net in method.networks.items():      # student (step 1), fake score + discriminator (step 0) moved
        assert any(not torch.equal(p, trained[name][n]) for n, p in net.named_parameters()), name
    for name, net in method.frozen.items():        # teacher, VAE, text encoders: bit-identical
        assert all(torch.equal(p, frozen[name][n]) for n, p in net.named_parameters()), name
    assert (tmp_path / "samples" / "step_000002.png").is_file()

    # the export is a Diffusers pipeline that generates the student's latents in one step from the same noise
    import diffusers

    info = json.loads((tmp_path / "model" / "fdistill.json").read_text())
    assert info["kind"] == "generator"
    sigma_g = method.generator_sigma
    assert sigma_g == pytest.approx(method.frozen["teacher"].sigma_max)          # t = T - 1
    assert info["generator_noise_scale"] == pytest.approx(math.sqrt(1 + sigma_g ** 2))
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipeline = cls.from_pretrained(tmp_path / "model")
    prompts = ["a red square", "a blue circle"]
    z = torch.randn(2, *method.sample_shape, generator=torch.Generator().manual_seed(0))
    latents = pipeline(prompts, latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                       height=16, width=16).images
    method.eval()
    with trainer.ema.swapped_in(), torch.no_grad():
        expected = method.student_sample(z, method.condition_of({"caption": prompts}, torch.device("cpu")))
    torch.testing.assert_close(latents, expected, atol=2e-5, rtol=1e-4)

    # and fdistill's loader sees a one-step text-conditioned generator with its VAE and text encoders
    denoiser, loaded = load_denoiser(tmp_path / "model")
    assert (loaded.kind, loaded.conditioning) == ("generator", "text")
    assert loaded.generator_input_scale == pytest.approx(math.sqrt(1 + sigma_g ** 2))
    assert {"vae", "text_encoder", "tokenizer"} <= set(loaded.components)


def test_sample_command_runs_the_exported_generator_with_a_prompt(tmp_path):
    from fdistill.commands.sample import main

    components = tiny_sd_components("sd15", image_size=8)
    method = build(FDistillConfig(student_update_freq=2), components, captioned_shapes(8, resolution=8))
    method.export(str(tmp_path / "model"))
    assert main(["--model", str(tmp_path / "model"), "--prompt", "a red square", "--num", "2",
                 "--out", str(tmp_path / "gen")]) == 0
    images = sorted(p.name for p in (tmp_path / "gen").glob("*.png"))
    assert len(images) == 3 and "grid.png" in images        # 2 samples + the preview grid


def _tiny_method(kind="sd15", **options):
    components = tiny_sd_components(kind, image_size=8)
    config = FDistillConfig(student_update_freq=2, **options)
    return build(config, components, captioned_shapes(8, resolution=8)), components


def test_teacher_guidance_is_cfg_of_the_unet_with_the_empty_prompt():
    """x0_cfg = x0(c) + (w - 1)(x0(c) - x0("")), computed here from the raw UNet epsilon and the DDPM schedule."""
    method, components = _tiny_method(guidance_scale=3.0)
    unet, scheduler = components.unet, components.scheduler
    timestep = 600
    abar = scheduler.alphas_cumprod[timestep].double()
    sigma = torch.sqrt((1 - abar) / abar).float()
    x_t = torch.randn(2, 4, 8, 8)                               # VP sample at t
    prompts = ["a red square", "a green cross"]
    cond, null = (encode_prompts(components, p)[0] for p in (prompts, ["", ""]))
    with torch.no_grad():
        eps_c, eps_u = (unet(x_t, timestep, encoder_hidden_states=c).sample for c in (cond, null))
        x0_c, x0_u = ((x_t - torch.sqrt(1 - abar).float() * e) / torch.sqrt(abar).float() for e in (eps_c, eps_u))
        guided = method.guided_teacher(x_t / torch.sqrt(abar).float(), sigma.expand(2),
                                       method.condition_of({"caption": prompts}, torch.device("cpu")))
    torch.testing.assert_close(guided, x0_c + 2.0 * (x0_c - x0_u), atol=1e-4, rtol=1e-4)


def test_real_samples_are_vae_latents_and_the_discriminator_reads_them():
    method, components = _tiny_method()
    batch = next(captioned_shapes(8, resolution=8).loader(4))
    items = method.prepare_step("critic", [batch], StepContext(0))
    torch.testing.assert_close(items[0].x_real, encode_latents(components.vae, batch["x"]))
    loss, logs = method.loss("critic", items[0], StepContext(0))
    loss.backward()
    head = method.networks["discriminator"].head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.ndim > 1)
    assert math.isfinite(logs["critic/discriminator"])


def test_prompt_only_data_needs_rkl_without_gan_and_then_has_no_discriminator(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# prompts\na red square\n\na blue circle\n")
    data = prompt_file(str(prompts))
    assert [data.dataset[i]["caption"] for i in range(len(data.dataset))] == ["a red square", "a blue circle"]
    components = tiny_sd_components("sd15", image_size=8)
    with pytest.raises(ValueError, match="method.divergence=rkl method.gan_weight=0"):
        build(FDistillConfig(divergence="js"), components, data)
    method = build(FDistillConfig(divergence="rkl", gan_weight=0.0, student_update_freq=2), components, data)
    assert "discriminator" not in method.networks
    assert [phase.networks for phase in method.phases()] == [("student",), ("fake_score",)]
    for phase in ("critic", "student"):
        item = method.prepare_step(phase, [next(data.loader(2))], StepContext(0))[0]
        loss, _ = method.loss(phase, item, StepContext(0))
        assert math.isfinite(loss.item())


def test_bad_text_to_image_data_names_the_setting(tmp_path):
    components = tiny_sd_components("sd15", image_size=8)
    with pytest.raises(ValueError, match="data.resolution=8"):
        build(FDistillConfig(), components, captioned_shapes(8, resolution=16))
    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        prompt_file(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompt_file(str(tmp_path / "empty.txt"))


def test_hf_images_with_a_caption_column(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (12, 10), colour) for colour in ("red", "blue")]
    table = datasets.Dataset.from_dict({"image": images, "text": [["a red square", "second"], ["a blue circle"]]})
    table.save_to_disk(str(tmp_path / "ds"))
    source = hf_images(str(tmp_path / "ds"), caption_column="text", resolution=8)
    assert [source.dataset[i]["caption"] for i in range(2)] == ["a red square", "a blue circle"]
    assert source.dataset[0]["x"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="caption_column='caption' is not a column"):
        hf_images(str(tmp_path / "ds"), caption_column="caption", resolution=8)


def test_command_line_reports_data_that_do_not_fit_the_model_in_one_line(tmp_path, capsys):
    from fdistill.commands.train import main

    assert main(["experiment=sd_tiny_fdistill", "data.resolution=8", f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "set data.resolution=16" in err and "Traceback" not in err
    assert main(["experiment=sd15_fdistill", "model=tiny_sd", "data=prompt_file", "data.path=missing.txt",
                 f"train.run_dir={tmp_path}"]) == 2
    assert "resolution" in capsys.readouterr().err        # the recipe's data.resolution does not fit a prompt file
