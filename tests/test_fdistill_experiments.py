"""f-distill experiments compose and run two steps (critic + student) with tiny stand-in models; `fdistill distill`."""
import dataclasses
import json

import pytest
import torch

from fdistill.benchmarks.fdistill_2d import recipe
from fdistill.config import ConfigError, build_run, compose
from fdistill.commands.distill import with_default_experiment
from fdistill.denoisers import load_denoiser
from fdistill.training import Trainer

SHRINK = ["train.steps=2", "train.batch_size=8", "train.device=cpu", "train.progress=false", "train.sample_every=0",
          "train.checkpoint_every=2", "method.student_update_freq=2"]


def run_two_steps(overrides, tmp_path):
    spec = compose([*overrides, *SHRINK, f"train.run_dir={tmp_path}"])
    run = build_run(spec, with_loggers=False)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in run.method.networks.items()}
    trainer = Trainer(run.method, run.data, spec.train)
    trainer.fit()
    for name, net in run.method.networks.items():
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before[name])), name
    return spec, run, trainer


@pytest.mark.parametrize("overrides", [
    ["experiment=gmm_fdistill", "method.network.hidden=16", "data.num_samples=64", "method.regression_warmup_steps=0",
     "method.critic_warmup_steps=0"],
    ["experiment=digits_fdistill"],
    ["experiment=digits_fdistill_exact"],
    ["experiment=cifar10_fdistill", "model=tiny_unet", "train.mixed_precision=no", "train.ema_decays=[0.9]"],
    ["experiment=imagenet64_fdistill", "model=tiny_unet", "model.num_classes=10", "train.mixed_precision=no",
     "train.ema_decays=[0.9]"],
], ids=["gmm", "digits", "digits_exact", "cifar10", "imagenet64"])
def test_experiments_compose_and_train_two_steps(overrides, tmp_path):
    spec, run, trainer = run_two_steps(overrides, tmp_path)
    assert spec.method_name == "fdistill"
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "model" / "fdistill.json").is_file()
    info = json.loads((tmp_path / "model" / "fdistill.json").read_text())
    assert info["kind"] == "generator" and info["generator_sigma"] == pytest.approx(run.method.generator_sigma)
    # the exported one-step generator (EMA weights) reproduces the method's samples
    method = run.method.eval()
    generator, _ = load_denoiser(tmp_path / "model")
    z = torch.randn(4, *method.sample_shape)
    cond = torch.arange(4) % method.num_classes if method.num_classes else None
    sigma = torch.full((4,), method.generator_sigma)
    with trainer.ema.swapped_in(), torch.no_grad():
        expected = method.student_sample(z, cond)
    assert torch.allclose(generator(method.generator_sigma * z, sigma, cond), expected, atol=1e-5)
    if (tmp_path / "model" / "unet" / "config.json").is_file() and "UNet2DModel" in (tmp_path / "model" / "unet" / "config.json").read_text():
        from diffusers import UNet2DModel

        assert UNet2DModel.from_pretrained(tmp_path / "model", subfolder="unet").config.sample_size == 8


def test_unknown_divergence_fails_at_composition_listing_the_seven():
    with pytest.raises(ConfigError) as error:
        compose(["experiment=digits_fdistill", "method.divergence=tv"])
    assert all(name in str(error.value) for name in ("rkl", "kl", "js", "sf", "sh", "jf", "neyman"))


def test_distill_defaults_to_the_digits_experiment():
    assert with_default_experiment([]) == ["experiment=digits_fdistill"]
    assert with_default_experiment(["train.steps=3"]) == ["experiment=digits_fdistill", "train.steps=3"]
    assert with_default_experiment(["experiment=gmm_fdistill"]) == ["experiment=gmm_fdistill"]


def test_text_to_image_recipe_needs_stable_diffusion_components():
    """The numbers of the recipes are checked against docs/recipes.md (tests/test_recipes.py); here: an SD recipe
    refuses a model that is not a set of Stable Diffusion components."""
    from fdistill.methods.fdistill import build

    with pytest.raises(ValueError, match="latent text-to-image components"):
        build(compose(["experiment=sd15_fdistill"]).method_config, object(), None)


def test_mixture_benchmark_trains_the_gmm_fdistill_recipe():
    """scripts/bench_fdistill_mixtures.py's recipe is conf/experiment/gmm_fdistill.yaml's method, field for field, with
    the student at every 5th step (the official default the family benchmark adopted)."""
    composed = compose(["experiment=gmm_fdistill"]).method_config
    assert dataclasses.asdict(composed) == dataclasses.asdict(recipe(composed.divergence, 2))
    assert composed.student_update_freq == 5
