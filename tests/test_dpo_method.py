"""Method ``diffusion_dpo`` on a tiny Stable Diffusion built from config (SD1.5 and SDXL layouts), offline, CPU."""
import copy
import json
import math

import pytest
import torch

from fdistill.data.preference import all_images_as_winners, shape_preferences
from fdistill.losses import diffusion_dpo_loss
from fdistill.methods.base import StepContext
from fdistill.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, build
from fdistill.methods.dpo_cache import cached_dataset
from fdistill.methods.dpo_eval import held_out_preference_metrics
from fdistill.pipelines import build_pipeline, encode_prompts
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training.config import SamplerConfig

SAMPLER = SamplerConfig(steps=2, guidance=1.0)
SIZE = 8          # pixels (= latent pixels: the tiny VAE does not downsample)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny kernels: one intra-op thread is much faster than two on a busy 2-core machine."""
    torch.set_num_threads(1)


def _method(kind="sd15", finetune="full", objective="dpo", num_pairs=16, **options):
    data = shape_preferences(num_pairs=num_pairs, resolution=SIZE)
    config = DiffusionDPOConfig(objective=objective, finetune=finetune, beta=options.pop("beta", 1000.0),
                                weight_decay=0.0, sampler=SAMPLER, **options)
    return build(config, tiny_sd_components(kind, image_size=SIZE), data), data


def _batch(data, size=8):
    return next(data.loader(size))


def _unet_params(module):
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_loss_is_log2_at_start_and_a_step_favours_the_winner(finetune):
    method, data = _method(finetune=finetune)
    batch = _batch(data)
    loss, logs = method.loss("model", batch, StepContext(0))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-4)
    assert abs(logs["logit"]) < 1e-3
    encoded = method.encode_batch(batch)
    before = method.errors(encoded, torch.Generator().manual_seed(3))      # one fixed (t, eps) draw per pair
    diffusion_dpo_loss(*(before[k] for k in ("model_w", "model_l", "ref_w", "ref_l")), 1000.0).mean().backward()
    params = [p for p in method.networks.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=1e-3 if finetune == "full" else 1e-1).step()
    after = method.errors(encoded, torch.Generator().manual_seed(3))
    margin = lambda e: ((e["model_w"] - e["model_l"]) - (e["ref_w"] - e["ref_l"])).mean().item()  # noqa: E731
    assert margin(before) == pytest.approx(0.0, abs=1e-6)
    assert margin(after) < -1e-6      # the winner's error went down relative to the loser's
    torch.testing.assert_close(after["ref_w"], before["ref_w"])     # the reference did not move


def test_lora_holds_one_unet_and_its_reference_is_the_base_model():
    method, data = _method(finetune="lora")
    full, _ = _method(finetune="full")
    base = copy.deepcopy(tiny_sd_components("sd15", image_size=SIZE).unet)          # same seed: the same initial weights
    lora_unets = _unet_params(method.networks) + _unet_params(method.frozen) - _unet_params(method.frozen["vae"]) \
        - _unet_params(method.frozen["text_encoder"])
    full_unets = _unet_params(full.networks) + _unet_params(full.frozen["reference"])
    assert lora_unets == _unet_params(base) and full_unets == 2 * _unet_params(base)
    assert set(method.frozen) == {"vae", "text_encoder"}
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    storage = {p.untyped_storage().data_ptr() for p in method.parameters()}
    assert len(storage) == len(list(method.parameters()))          # no hidden copies sharing nothing
    for name, p in method.networks["unet"].named_parameters():     # move the tuned model away from the base
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    x, t = torch.randn(2, 4, SIZE, SIZE), torch.tensor([10, 700])
    cond = method.text_conditioning(["a red square", "a blue circle"])
    with torch.no_grad():
        tuned = method.networks["unet"](x, t, **cond).sample
        with method.reference_unet() as reference:
            ref = reference(x, t, **cond).sample
        expected = base(x, t, **cond).sample
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-6)      # other modules: other kernels
    assert (tuned - expected).abs().max() > 1e-3
    assert method.networks["unet"].active_adapters()               # adapters re-enabled after the reference pass


def _fit(method, data, steps, batch_size, lr):
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    batches = data.loader(batch_size, seed=0)
    for step in range(steps):
        loss, _ = method.loss("model", next(batches), StepContext(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_few_steps_raise_held_out_implicit_accuracy():
    """An unbiased reference (40 SFT steps on winners and losers alike), then 6 LoRA DPO steps on the
    caption-independent 'brightness' pairs; measured on held-out pairs with fixed (t, eps) draws."""
    data = shape_preferences(num_pairs=256, resolution=SIZE, rule="brightness")
    components = tiny_sd_components("sd15", image_size=SIZE)
    sft = build(DiffusionDPOConfig(objective="sft", sampler=SAMPLER), components, data)
    _fit(sft, all_images_as_winners(data), steps=40, batch_size=32, lr=2e-3)
    components.unet = sft.networks["unet"]
    method = build(DiffusionDPOConfig(finetune="lora", beta=1000.0, sampler=SAMPLER), components, data)
    test = shape_preferences(num_pairs=64, resolution=SIZE, split="test", rule="brightness").dataset
    before = held_out_preference_metrics(method, test, batch_size=64, draws=4)
    assert before["implicit_accuracy"] == 0.0 and before["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    _fit(method, data, steps=6, batch_size=16, lr=3e-3)
    after = held_out_preference_metrics(method, test, batch_size=64, draws=4)
    assert after["implicit_accuracy"] > 0.6
    assert after["dpo_loss"] < math.log(2.0)


@pytest.mark.parametrize("micro_conditioning, original_and_crop", [("resolution", [SIZE, SIZE, 0, 0]),
                                                                     ("data", [64, 48, 3, 5])])
def test_sdxl_conditioning_reaches_the_unet(micro_conditioning, original_and_crop):
    """Time ids: [res, res, 0, 0, res, res] by default (the released DPO code), the batch's stored size and crop
    offsets with sdxl_micro_conditioning='data' (the Diffusers SDXL training example)."""
    method, data = _method(kind="sdxl", finetune="lora", sdxl_micro_conditioning=micro_conditioning)
    batch = _batch(data, 4)
    batch["original_size"] = torch.tensor([[64, 48]] * 4)
    batch["crop_top_left"] = torch.tensor([[3, 5]] * 4)
    seen = []
    hook = method.networks["unet"].register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    method.loss("model", batch, StepContext(0))
    hook.remove()
    assert len(seen) == 2                                          # model pass + reference pass (same UNet)
    added = seen[0]["added_cond_kwargs"]
    expected_ids = torch.tensor([[*original_and_crop, SIZE, SIZE]]).float().expand(8, 6)          # winners then losers
    torch.testing.assert_close(added["time_ids"], expected_ids)
    components = method.sd.parts
    prompt_embeds, pooled = encode_prompts(components, batch["caption"])
    torch.testing.assert_close(added["text_embeds"], torch.cat([pooled, pooled]))
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], torch.cat([prompt_embeds, prompt_embeds]))
    assert prompt_embeds.shape[-1] == 64                            # both encoders' states concatenated
    x, t = torch.randn(1, 4, SIZE, SIZE), torch.tensor([500])
    cond = method.text_conditioning(["a red square"])
    other = copy.deepcopy(cond)
    other["added_cond_kwargs"]["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, SIZE, SIZE]])
    with torch.no_grad():
        unet = method.networks["unet"]
        assert (unet(x, t, **cond).sample - unet(x, t, **other).sample).abs().max() > 1e-4


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_export_loads_in_a_diffusers_pipeline(tmp_path, finetune):
    from diffusers import StableDiffusionPipeline

    method, data = _method(finetune=finetune)
    for name, p in method.networks["unet"].named_parameters():     # a "tuned" model different from the base
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    method.export(tmp_path / "model")
    if finetune == "full":
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None)
    else:
        pipe = build_pipeline(tiny_sd_components("sd15", image_size=SIZE))          # the base model, then the LoRA
        pipe.load_lora_weights(str(tmp_path / "model"))
    x, t = torch.randn(2, 4, SIZE, SIZE), torch.tensor([10, 900])
    cond = method.text_conditioning(["a red square", "a green cross"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, **cond).sample, method.networks["unet"](x, t, **cond).sample,
                                   rtol=1e-5, atol=1e-5)
    tuned_pipe = method.sd.pipeline(method.networks["unet"])
    images = [p("a red square", num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images for p in (pipe, tuned_pipe)]
    torch.testing.assert_close(images[0], images[1], rtol=1e-4, atol=1e-4)


def test_sft_uses_only_winners_and_no_reference():
    method, data = _method(objective="sft", finetune="full")
    batch = _batch(data, 4)
    calls = []
    for unet in (method.networks["unet"], method.frozen["reference"]):
        unet.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    torch.manual_seed(5)
    loss, logs = method.loss("model", batch, StepContext(0))
    assert calls == [4] and set(logs) == {"loss", "err_w"}
    assert loss.item() == pytest.approx(logs["err_w"], rel=1e-6)


def test_generate_and_reference_samples_share_noise():
    method, _ = _method(finetune="lora")
    images = method.generate(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, SIZE, SIZE) and images.abs().max() <= 1
    reference = method.sample_images(method.prompts[:3], torch.Generator().manual_seed(0), reference=True)
    torch.testing.assert_close(images, reference)                  # LoRA B = 0: tuned == reference at start


def test_cache_encodes_once_and_trains_from_latents(tmp_path):
    cache = tmp_path / "cache.pt"
    method, data = _method(kind="sdxl", finetune="lora", cache_path=str(cache))
    assert cache.is_file() and set(data.dataset.tensors) == {"latents_w", "latents_l", "prompt_embeds",
                                                             "pooled_prompt_embeds", "time_ids"}
    stamp = cache.stat().st_mtime_ns
    again = cached_dataset(method, shape_preferences(num_pairs=16, resolution=SIZE).dataset, cache)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.tensors["latents_w"], data.dataset.tensors["latents_w"])
    loss, _ = method.loss("model", _batch(data, 4), StepContext(0))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-4)
    with pytest.raises(ValueError, match="holds 16 pairs but the data has 8"):
        cached_dataset(method, shape_preferences(num_pairs=8, resolution=SIZE).dataset, cache)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="method.finetune must be one of"):
        DiffusionDPOConfig(finetune="qlora")
    with pytest.raises(ValueError, match="method.objective"):
        DiffusionDPOConfig(objective="ipo")
    with pytest.raises(ValueError, match="method.beta"):
        DiffusionDPOConfig(beta=-1.0)
    with pytest.raises(TypeError, match="SDComponents"):
        build(DiffusionDPOConfig(), torch.nn.Linear(2, 2), shape_preferences(num_pairs=4, resolution=SIZE))


def test_train_command_runs_dpo_tiny(tmp_path):
    from fdistill.commands.train import main

    run_dir = tmp_path / "run"
    overrides = ["experiment=dpo_tiny", "train.batch_size=4", "train.sample_every=0", "train.progress=false",
                 f"train.run_dir={run_dir}", "data.num_pairs=16", f"data.resolution={SIZE}", f"model.image_size={SIZE}"]
    assert main(overrides + ["train.steps=2"]) == 0
    assert main(overrides + ["train.steps=3"]) == 0                  # resumes the LoRA run from step 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert (run_dir / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert "implicit_accuracy" in (run_dir / "metrics.jsonl").read_text()


def test_scale_lr_multiplies_the_lr_by_the_global_batch_in_pairs():
    """The released code's --scale_lr: lr x gradient accumulation x per-device batch x processes = lr x the global
    batch (train.batch_size), whatever the split into processes and micro-batches."""
    from fdistill.config import compose

    for processes_split in (["train.micro_batches=256"], ["train.micro_batches=8"]):
        spec = compose(["experiment=dpo_sd15", "train.batch_size=512", *processes_split])
        assert spec.method_config.lr == 1e-8 and spec.method_config.scale_lr
        assert spec.method_config.optimizer_lr() == pytest.approx(1e-8 * 512)
    config = DiffusionDPOConfig(lr=1e-8, scale_lr=True)
    with pytest.raises(ValueError, match="scale_lr=true needs the global batch"):
        config.optimizer_lr()
    config.check_train(compose(["experiment=dpo_tiny", "train.batch_size=4"]).train)
    method = DiffusionDPO(config, tiny_sd_components("sd15", image_size=SIZE), (SIZE, SIZE))
    assert method.phases()[0].lr == pytest.approx(4e-8)
    assert DiffusionDPOConfig(lr=1e-8).optimizer_lr() == 1e-8                 # default: lr is the optimizer's LR
    with pytest.raises(ValueError, match="method.sdxl_micro_conditioning must be one of"):
        DiffusionDPOConfig(sdxl_micro_conditioning="crop")


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        method, data = _method(finetune="lora", gradient_checkpointing=checkpointing)
        assert method.networks["unet"].is_gradient_checkpointing == checkpointing
        method.train()
        torch.manual_seed(1)
        loss, _ = method.loss("model", _batch(data, 4), StepContext(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
