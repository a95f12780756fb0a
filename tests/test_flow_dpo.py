"""Diffusion-DPO on a rectified-flow model (tiny SD3 built from config, CPU): the loss starts at log 2, a step favours
the winner, and the exports load in StableDiffusion3Pipeline (full pipeline; LoRA via load_lora_weights)."""
import math

import pytest
import torch

from fdistill.data.preference import shape_preferences
from fdistill.tiny_flow import tiny_sd3_components
from fdistill.losses import diffusion_dpo_loss
from fdistill.methods.base import StepContext
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build
from fdistill.training.config import SamplerConfig

SIZE = 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _method(finetune):
    data = shape_preferences(num_pairs=8, resolution=SIZE)
    config = DiffusionDPOConfig(finetune=finetune, beta=1000.0, weight_decay=0.0,
                                sampler=SamplerConfig(steps=2, guidance=1.0))
    return build(config, tiny_sd3_components(image_size=SIZE), data), data


def _velocity(net, x_t, cond):
    return net(hidden_states=x_t, timestep=torch.full((len(x_t),), 500.0), return_dict=False,
               encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"])[0]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_sd3_dpo_step_favours_the_winner_and_the_export_loads_in_diffusers(finetune, tmp_path):
    import diffusers

    method, data = _method(finetune)
    assert method.sd.kind == "sd3" and method._denoisers["model"].loss_weighting == "flow_velocity"
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
        pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "out")
    else:
        pipeline = method.sd.pipeline(tiny_sd3_components(image_size=SIZE).transformer)   # the base (same seed)
        pipeline.load_lora_weights(tmp_path / "out")
    cond = method.text_conditioning(["a red square"])
    x_t = torch.randn(1, 4, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(_velocity(pipeline.transformer, x_t, cond),
                                   _velocity(method.networks["unet"], x_t, cond), atol=1e-5, rtol=1e-4)
