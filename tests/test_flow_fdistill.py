"""f-distill of a rectified-flow teacher (tiny SD3 / Flux built from config, CPU): training runs, and the exported
StableDiffusion3Pipeline / FluxPipeline generates the student's latents in the student's step count from the same
noise (one- and few-step)."""
import json
import math

import pytest
import torch

from fdistill.config import build_run, compose
from fdistill.data import captioned_shapes
from fdistill.denoisers import load_denoiser
from fdistill.tiny_flow import tiny_sd3_components
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.training import Trainer

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _pipeline_latents(directory, kind: str, z: torch.Tensor, sigmas: list[float], seed: int,
                      output_type: str = "latent") -> torch.Tensor:
    """The exported pipeline's latents [B, C, H, W] (``output_type="pt"``: images [B, 3, H, W] in [0, 1]) for PROMPTS
    from initial latents z [B, C, H, W] at flow times ``sigmas``, a stochastic scheduler re-noising from torch's
    global generator seeded with ``seed``; Flux runs at its embedded guidance (the student's), SD3 without
    classifier-free guidance."""
    import diffusers

    from fdistill.denoisers.flow import pack_latents, unpack_latents
    from fdistill.flow_pipelines import FLUX_GUIDANCE

    flux = kind == "flux"
    pipeline = (diffusers.FluxPipeline if flux else diffusers.StableDiffusion3Pipeline).from_pretrained(directory)
    torch.manual_seed(seed)
    out = pipeline(PROMPTS[:len(z)], latents=pack_latents(z) if flux else z, sigmas=sigmas, output_type=output_type,
                   guidance_scale=FLUX_GUIDANCE if flux else 1.0, height=8, width=8).images
    return unpack_latents(out, 8, 8) if flux and output_type == "latent" else out


def _pipeline_renoise(kind: str, steps: int, shape: tuple[int, ...], seed: int) -> torch.Tensor | None:
    """The re-noising [steps - 1, B, C, H, W] that ``_pipeline_latents``' stochastic scheduler draws (randn of its
    latents: Flux's packed [B, H W / 4, 4 C]), None for one step."""
    from fdistill.denoisers.flow import unpack_latents

    if steps == 1:
        return None
    torch.manual_seed(seed)
    batch, channels, height, width = shape
    if kind == "flux":
        draws = [unpack_latents(torch.randn(batch, height * width // 4, 4 * channels), height, width)
                 for _ in range(steps - 1)]
    else:
        draws = [torch.randn(shape) for _ in range(steps - 1)]
    return torch.stack(draws)


@pytest.mark.parametrize("model, generator_sigmas", [("tiny_sd3", None), ("tiny_flux", None),
                                                     ("tiny_flux", [9.0, 1.0])])
def test_fdistill_trains_a_flow_student_and_exports_a_pipeline_with_the_students_latents(model, generator_sigmas,
                                                                                           tmp_path):
    kind = model.removeprefix("tiny_")
    overrides = [] if generator_sigmas is None else [f"method.generator_sigmas={generator_sigmas}"]
    if kind == "flux":              # guidance is embedded (the flux_fdistill recipe), not classifier-free
        overrides.append("method.guidance_scale=1.0")
    spec = compose(["experiment=sd_tiny_fdistill", f"model={model}", "model.image_size=8",
                    "data.num_images=8", "data.resolution=8", "train.steps=2", "train.batch_size=2",
                    "train.sample_every=2", "train.num_samples=2", "train.checkpoint_every=2", "train.log_every=1",
                    "train.progress=false", "train.mixed_precision=no", "method.student_update_freq=2",
                    f"train.run_dir={tmp_path}", *overrides])
    run = build_run(spec, with_loggers=False)
    method = run.method
    assert method.domain.kind == kind and method.domain.input_scaling == "flow"
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in method.networks.items()}
    trainer = Trainer(method, run.data, spec.train)
    trainer.fit()
    for name, net in method.networks.items():
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before[name])), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [value for row in rows for key, value in row.items() if "loss" in key]
    assert len(rows) == 2 and losses and all(v is not None and math.isfinite(v) for v in losses)   # null: NaN/inf

    sigmas = generator_sigmas or [method.generator_sigma]
    assert sigmas[0] == pytest.approx(method.frozen["teacher"].sigma_max if generator_sigmas is None else 9.0)
    assert method.generator_noise_scale == pytest.approx(1 + sigmas[0])       # x_t = x / (1 + sigma) = z
    info = json.loads((tmp_path / "model" / "fdistill.json").read_text())
    assert (info["kind"], info["wrapper"]) == ("generator", "flow")
    assert info["diffusers_sigmas"] == pytest.approx([s / (1 + s) for s in sigmas])
    z = torch.randn(2, *method.sample_shape, generator=torch.Generator().manual_seed(0))
    latents = _pipeline_latents(tmp_path / "model", kind, z, info["diffusers_sigmas"], seed=5)
    renoise = _pipeline_renoise(kind, len(sigmas), tuple(z.shape), seed=5)
    method.eval()
    with trainer.ema.swapped_in(), torch.no_grad():
        cond = method.condition_of({"caption": PROMPTS}, torch.device("cpu"))
        expected = method.student_sample(z, cond, renoise)
    if kind == "flux":
        assert cond["guidance"].tolist() == [3.5, 3.5]                  # the embedded guidance of FLUX.1-dev
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)

    denoiser, loaded = load_denoiser(tmp_path / "model")
    assert (loaded.kind, loaded.conditioning, loaded.wrapper) == ("generator", "text", "flow") and denoiser.flow
    assert info["sample_shape"] == list(method.sample_shape) and loaded.sample_shape == (4, 8, 8)   # the trained size
    if kind == "flux" and generator_sigmas is None:       # fdistill sample draws the pipeline's (= student's) images
        from fdistill.commands.sample import image_noise, main
        from fdistill.images import load_images

        assert main(["--model", str(tmp_path / "model"), "--prompt", PROMPTS[0], "--num", "1", "--no-progress",
                     "--out", str(tmp_path / "gen")]) == 0
        z = image_noise(0, 0, 1, tuple(method.sample_shape))
        images = _pipeline_latents(tmp_path / "model", kind, z, info["diffusers_sigmas"], 0, output_type="pt")
        torch.testing.assert_close((load_images(tmp_path / "gen", "000000.png") + 1) / 2, images, atol=2.5 / 255,
                                   rtol=0)
    assert {"vae", "text_encoder", "text_encoder_2"} <= set(loaded.components)
    assert ("text_encoder_3" in loaded.components) == (kind == "sd3")        # SD3's T5; Flux's is text_encoder_2


def test_few_step_sd3_generator_exports_a_stochastic_flow_match_pipeline_running_the_same_chain(tmp_path):
    import diffusers

    from fdistill.commands.sample import main

    sigmas = [9.0, 1.0]                                  # flow times 0.9, 0.5
    method = build(FDistillConfig(generator_sigmas=sigmas), tiny_sd3_components(image_size=8),
                   captioned_shapes(8, resolution=8)).eval()
    method.export(str(tmp_path / "model"))
    info = json.loads((tmp_path / "model" / "fdistill.json").read_text())
    assert info["diffusers_sigmas"] == pytest.approx([0.9, 0.5])
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "model")
    assert pipeline.scheduler.config.stochastic_sampling and pipeline.scheduler.config.shift == 1.0
    z = torch.randn(1, 4, 8, 8)
    torch.manual_seed(5)                                 # the scheduler re-noises with torch.randn_like
    latents = pipeline(["a red square"], latents=z, sigmas=info["diffusers_sigmas"], guidance_scale=1.0,
                       output_type="latent", height=8, width=8).images
    torch.manual_seed(5)
    renoise = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        expected = method.student_sample(z, method.condition_of({"caption": ["a red square"]}, torch.device("cpu")),
                                         renoise)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)
    assert main(["--model", str(tmp_path / "model"), "--prompt", "a red square", "--num", "2",
                 "--out", str(tmp_path / "gen"), "--no-progress"]) == 0


@pytest.mark.parametrize("experiment, model", [("sd3_fdistill", "tiny_sd3"), ("flux_fdistill", "tiny_flux"),
                                               ("sd3_dpo", "tiny_sd3")])
def test_flow_recipes_build_on_tiny_models(experiment, model):
    dpo = experiment.endswith("dpo")
    data = "data=preference_builtin" if dpo else "data=captioned_shapes"
    spec = compose([f"experiment={experiment}", f"model={model}", "model.image_size=8", data,
                    "data.resolution=8", "train.device=cpu", "model.torch_dtype=null"])
    method = build_run(spec, with_loggers=False).method
    assert (method.sd if dpo else method.domain).kind == model.removeprefix("tiny_")


def test_rehearsal_rows_count_the_published_sd3_and_flux_networks_without_building_them():
    from fdistill.rehearsal import GIB, REHEARSALS, estimate_gib

    # SD3 medium DPO full: transformer trained (fp32 weights and gradients; the estimate counts no Adafactor state)
    # + frozen fp32 reference; bf16 VAE, CLIP-L, CLIP-G and T5-XXL
    transformer, vae, clip_l, clip_g, t5 = 2_028_328_000, 83_819_683, 123_650_304, 694_659_840, 4_762_310_656
    expected = (transformer * (4 + 4 + 4) + 2 * (vae + clip_l + clip_g + t5)) / GIB
    assert estimate_gib(REHEARSALS["sd3_dpo_full"], frozen_dtype="bfloat16") == pytest.approx(expected)
    flux = estimate_gib(REHEARSALS["flux_fdistill"], frozen_dtype="bfloat16")
    assert flux > 11_901_408_320 * (2 * 16 + 4) / GIB                   # student + fake score (AdamW) + teacher


def test_published_transformer_sizes_on_the_meta_device_and_the_cpu_rehearsal_skips_them():
    import importlib.util
    from pathlib import Path

    from fdistill.architectures import flow_components_from_config

    with torch.device("meta"):                  # the published configs, no memory
        sizes = {kind: sum(p.numel() for p in flow_components_from_config(kind).transformer.parameters())
                 for kind in ("sd3", "flux")}
    assert (round(sizes["sd3"] / 1e9, 1), round(sizes["flux"] / 1e9, 1)) == (2.0, 11.9)    # SD3 medium, FLUX.1-dev
    path = Path(__file__).resolve().parent.parent / "scripts" / "rehearse.py"
    spec = importlib.util.spec_from_file_location("rehearse_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = "sd3_fdistill,sd3_dpo_lora,sd3_dpo_full,flux_fdistill"
    args = script.parse_args(["--recipes", rows])                       # CPU defaults: 8 GiB
    for name in rows.split(","):
        status = script.run_row(name, False, args).status
        assert status.startswith("skipped: estimated minimum") and status.endswith("GiB > 8 GiB"), (name, status)
