"""The real-size rehearsal's code path (fdistill.rehearsal) on a recipe with a tiny network in place of the real one:
the recipe composes, builds and trains through the trainer, and the table's fields count what the run holds."""
from __future__ import annotations

import math

import pytest
import torch
from factories import small_sd_architecture, tiny_unet2d

from fdistill import architectures
from fdistill.config import compose
from fdistill.rehearsal import (GIB, REHEARSALS, Rehearsal, estimate_gib, format_table, optimizer_state_bytes,
                                rehearse)

TINY = "tiny-unet-32"


def rehearsal_unet():
    """A CIFAR-shaped UNet ([B, 3, 32, 32]) small enough for the test."""
    return tiny_unet2d(out_channels=3, sample_size=32, in_channels=3, block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture
def tiny_architecture(monkeypatch):
    monkeypatch.setitem(architectures.DENOISER_ARCHITECTURES, TINY,
                        (rehearsal_unet, architectures.DDPM_CIFAR10_SCHEDULER))
    return sum(p.numel() for p in rehearsal_unet().parameters())


def test_cifar10_fdistill_recipe_trains_both_phases_and_counts_its_memory(tiny_architecture):
    row = Rehearsal("tiny_cifar10_fdistill", "cifar10_fdistill", TINY, "images", (3, 32, 32), 10, trained_copies=2)
    result = rehearse(row, steps=3, batch=2, device="cpu")
    unet_params = tiny_architecture
    assert result.status == "ok"
    assert result.steps == [2, 3, 4] and result.phases == ["critic", "critic", "student"]   # student every 5th step
    assert len(result.step_seconds) == 3 and all(math.isfinite(loss) for loss in result.losses)
    recipe = compose(["experiment=cifar10_fdistill"]).train
    assert result.mixed_precision == recipe.mixed_precision == "no"   # fp32, as the official EDM-teacher configs
    assert result.frozen_params == unet_params                 # the teacher
    assert result.trained_params > 2 * unet_params             # student + fake score + discriminator head
    analytic = {k: v * GIB for k, v in result.analytic.items()}
    assert analytic["trained_weights"] == pytest.approx(4 * result.trained_params)
    critic_params = result.trained_params - unet_params       # fake score + head: the larger phase
    assert analytic["gradients"] == pytest.approx(4 * critic_params)
    assert analytic["optimizer_states"] == pytest.approx(2 * analytic["trained_weights"])   # AdamW moments
    assert analytic["ema"] >= 4 * unet_params                  # one EMA copy of the student (recipe: 0.9999)
    assert analytic["frozen"] >= 4 * unet_params
    assert result.analytic_gib == pytest.approx(sum(result.analytic.values()))
    assert result.peak_gib >= result.resident_before_gib
    assert result.ratio == pytest.approx((result.peak_gib - result.runtime_gib) / result.analytic_gib)
    table = format_table([result])
    assert table.splitlines()[-1].startswith(f"| tiny_cifar10_fdistill | {result.trained_params:,} | ")


def test_estimate_counts_the_recipes_real_networks_without_building_them():
    # SD1.5 DPO full: UNet trained (fp32 weights, grads, AdamW) + frozen reference UNet, bf16 VAE and text encoder
    unet, vae, text = 859_520_964, 83_653_863, 123_060_480
    expected = (unet * (16 + 4) + 2 * (vae + text)) / GIB
    assert estimate_gib(REHEARSALS["sd15_dpo_full"], frozen_dtype="bfloat16") == pytest.approx(expected)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_bytes_match_the_optimizers_state(optimizer):
    from fdistill.training.optimization import build_optimizer
    from fdistill.methods.base import Phase

    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(6, 5), (4, 3, 2, 2), (7,)]]
    opt = build_optimizer(Phase("p", ("n",), lr=1e-3, optimizer=optimizer), params)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t) and t.ndim > 0)
    assert held == sum(optimizer_state_bytes(p, optimizer) for p in params)


def test_sd15_dpo_full_recipe_with_the_bare_loop(monkeypatch):
    monkeypatch.setitem(architectures.SD_ARCHITECTURES, "sd15", small_sd_architecture("sd15"))
    components = architectures.sd_components_from_config("sd15", latent_size=8)
    unet = sum(p.numel() for p in components.unet.parameters())
    others = sum(p.numel() for m in (components.vae, components.text_encoder) for p in m.parameters())
    result = rehearse(REHEARSALS["sd15_dpo_full"], steps=2, batch=1, device="cpu", bare=True,
                      frozen_dtype="bfloat16")
    assert result.status == "ok" and result.frozen_dtype == "bfloat16"
    assert (result.trained_params, result.frozen_params) == (unet, unet + others)   # UNet; reference + VAE + text
    # two steps: the steady time is the second step's (the first allocates optimizer states)
    assert len(result.bare_step_cpu_seconds) == 2
    assert result.trainer_over_bare == pytest.approx(result.bare_step_cpu_seconds[1] / result.step_cpu_seconds[1])


def test_sdxl_fdistill_recipe_runs_both_phases(monkeypatch):
    monkeypatch.setitem(architectures.SD_ARCHITECTURES, "sdxl", small_sd_architecture("sdxl"))
    result = rehearse(REHEARSALS["sdxl_fdistill"], steps=2, batch=1, device="cpu", frozen_dtype="bfloat16")
    assert result.phases == ["critic", "student"] and all(math.isfinite(loss) for loss in result.losses)
