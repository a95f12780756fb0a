"""Diffusion-DPO on a rectified-flow model (tiny SD3 / Flux built from config, CPU): the loss starts at log 2, a step
favours the winner, the exports load in StableDiffusion3Pipeline / FluxPipeline (full pipeline; LoRA via
load_lora_weights), and the trainer runs a few finite steps of the sd3_dpo recipe on each."""
import math

import pytest
import torch

from fdistill.data.preference import shape_preferences
from fdistill.denoisers.flow import FLOW_MODEL_CALLS
from fdistill.tiny_flow import tiny_flux_components, tiny_sd3_components
from fdistill.losses import diffusion_dpo_loss
from fdistill.methods.base import StepContext
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build
from fdistill.training.config import SamplerConfig

SIZE = 8
TINY = {"sd3": tiny_sd3_components, "flux": tiny_flux_components}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _method(kind, finetune):
    data = shape_preferences(num_pairs=8, resolution=SIZE)
    config = DiffusionDPOConfig(finetune=finetune, beta=1000.0, weight_decay=0.0,
                                sampler=SamplerConfig(steps=2, guidance=1.0))
    return build(config, TINY[kind](image_size=SIZE), data), data


def _velocity(net, x_t, cond):
    """The network's velocity [B, C, H, W] at timestep 500 (Flux: its packed call, ``fdistill.denoisers.flow``)."""
    return FLOW_MODEL_CALLS[type(net).__name__](net, x_t, torch.full((len(x_t),), 500.0), cond)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_flow_dpo_step_favours_the_winner_and_the_export_loads_in_diffusers(kind, finetune, tmp_path):
    method, data = _method(kind, finetune)
    assert method.sd.kind == kind and method._denoisers["model"].loss_weighting == "flow_velocity"
    batch = next(data.loader(4))
    loss, _ = method.loss("model", batch, StepContext(0))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-4)
    encoded = method.encode_batch(batch)
    before = method.errors(encoded, torch.Generator().manual_seed(3))
    diffusion_dpo_loss(*(before[k] for k in ("model_w", "model_l", "ref_w", "ref_l")), 1000.0).mean().backward()
    params = [p for p in method.networks.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=1e-3 if finetune == "full" else 1e-1).step()
    after = method.errors(encoded, torch.Generator().manual_seed(3))
    margin = lambda e: ((e["model_w"] - e["model_l"]) - (e["ref_w"] - e["ref_l"])).mean().item()  # noqa: E731
    assert margin(after) < -1e-6
    torch.testing.assert_close(after["ref_w"], before["ref_w"])

    method.export(tmp_path / "out")
    if finetune == "full":
        pipeline = type(method.sd.pipeline()).from_pretrained(tmp_path / "out")     # StableDiffusion3 / FluxPipeline
    else:
        pipeline = method.sd.pipeline(TINY[kind](image_size=SIZE).transformer)     # the base (same seed)
        pipeline.load_lora_weights(tmp_path / "out")
    cond = method.text_conditioning(["a red square"])
    x_t = torch.randn(1, 4, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(_velocity(pipeline.transformer, x_t, cond),
                                   _velocity(method.networks["unet"], x_t, cond), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"])
def test_sd3_dpo_recipe_trains_a_few_finite_steps_on_tiny_flow_models(model, tmp_path):
    import json

    from fdistill.config import build_run, compose
    from fdistill.training import Trainer

    spec = compose(["experiment=sd3_dpo", f"model={model}", f"model.image_size={SIZE}", "model.torch_dtype=null",
                    "data=preference_builtin", f"data.resolution={SIZE}", "train.device=cpu", "train.steps=2",
                    "train.batch_size=4", "train.micro_batches=2", "train.mixed_precision=no", "train.log_every=1",
                    "train.lr_warmup_steps=0", "train.sample_every=0", "train.checkpoint_every=2",
                    "train.progress=false", "method.gradient_checkpointing=false", "method.lr=1e-3",
                    "method.scale_lr=false", f"train.run_dir={tmp_path}"])
    run = build_run(spec, with_loggers=False)
    net = run.method.networks["unet"]
    before = [p.detach().clone() for p in net.parameters()]
    Trainer(run.method, run.data, spec.train).fit()
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row[key] for row in rows for key in row if "loss" in key]
    assert len(rows) == 2 and losses and all(v is not None and math.isfinite(v) for v in losses)   # null: NaN/inf
    assert type(run.method.sd.pipeline()).from_pretrained(tmp_path / "model").transformer is not None
