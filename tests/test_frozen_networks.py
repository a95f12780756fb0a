"""Frozen networks (teacher, reference, VAE, text encoders) stay in eval mode whatever the trainer does: a teacher with
dropout 0.5 gives identical outputs on repeated calls during f-distill, DDO and Diffusion-DPO training."""
import pytest
import torch
from torch import nn

from fdistill.data.base import DataSource, TensorDictDataset
from fdistill.data.preference import shape_preferences
from fdistill.denoisers.edm import EDMPrecond
from fdistill.methods import ddo, diffusion_dpo, fdistill
from fdistill.networks import build_unet
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training import Trainer, TrainConfig
from fdistill.training.config import SamplerConfig

SHAPE = (1, 8, 8)
DROPOUT = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def dropout_unet() -> EDMPrecond:
    """A tiny EDM-preconditioned Diffusers UNet2DModel with dropout 0.5 in every residual block."""
    torch.manual_seed(0)
    unet = build_unet(SHAPE[1], SHAPE[0], (8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                      dropout=DROPOUT)
    return EDMPrecond(unet)


def image_data(num: int = 32) -> DataSource:
    return DataSource(TensorDictDataset(x=torch.rand(num, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1),
                      SHAPE, 0)


def record_dropout_modes(network: nn.Module) -> list[bool]:
    """The ``training`` flag of every dropout layer of ``network`` each time it runs (filled in as it runs)."""
    modes = []
    for module in network.modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(lambda m, args, output: modes.append(m.training))
    return modes


def repeated_outputs_agree(denoiser: nn.Module) -> bool:
    """Two calls on the same input give the same x0 (dropout off)."""
    generator = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(4, *SHAPE, generator=generator), torch.full((4,), 0.5)
    with torch.no_grad():
        first, second = denoiser(x, sigma), denoiser(x, sigma)
    return torch.allclose(first, second, rtol=1e-6, atol=1e-6)


def fit(method, data, tmp_path, steps: int) -> None:
    config = TrainConfig(steps=steps, batch_size=4, device="cpu", progress=False, run_dir=str(tmp_path),
                         export=False, ema_decays=[])
    Trainer(method, data, config).fit()


def test_dropout_unet_is_noisy_in_train_mode():
    """The premise: this teacher's outputs differ between calls when its dropout is on."""
    assert not repeated_outputs_agree(dropout_unet().train())


def test_fdistill_teacher_runs_without_dropout_during_training(tmp_path):
    config = fdistill.FDistillConfig(divergence="js", student_update_freq=2, features="teacher", gan_weight=0.1,
                                     sigma_min=0.01, sigma_max=10.0)
    method = fdistill.build(config, dropout_unet(), image_data())
    modes = record_dropout_modes(method.frozen["teacher"])
    fit(method, image_data(), tmp_path, steps=2)          # one critic and one student step
    assert modes and not any(modes)                        # the teacher ran, never with dropout on
    assert method.networks["student"].training            # the trained networks are in train mode
    assert repeated_outputs_agree(method.frozen["teacher"])


def test_ddo_reference_stays_in_eval_mode_during_training(tmp_path):
    config = ddo.DDOConfig(fake_pool_size=4, generation_batch=4, steps_per_round=2,
                           sampler={"steps": 2, "sigma_min": 0.01, "sigma_max": 10.0})
    method = ddo.build(config, dropout_unet(), image_data())
    modes = record_dropout_modes(method.frozen["reference"])
    fit(method, image_data(), tmp_path, steps=2)
    assert modes and not any(modes)
    assert method.networks["model"].training
    assert repeated_outputs_agree(method.frozen["reference"])


def test_dpo_reference_errors_are_repeatable_in_train_mode():
    """After ``method.train()`` (what the trainer calls) the frozen reference's errors at a fixed (t, eps) draw are the
    same on every call, while the tuned UNet's dropout is on (its errors differ). (LoRA mode has no frozen reference:
    it is the tuned UNet with adapters off, in the tuned UNet's mode, so that theta = ref holds bitwise at the start.)"""
    components = tiny_sd_components("sd15", image_size=8)
    for module in components.unet.modules():     # (UNet2DConditionModel's own ``dropout`` does not reach its blocks)
        if isinstance(module, nn.Dropout):
            module.p = DROPOUT
    data = shape_preferences(num_pairs=4, resolution=8)
    config = diffusion_dpo.DiffusionDPOConfig(finetune="full", sampler=SamplerConfig(steps=2))
    method = diffusion_dpo.build(config, components, data).train()
    encoded = method.encode_batch(next(data.loader(4)))
    first, second = (method.errors(encoded, torch.Generator().manual_seed(3), pairs=True) for _ in range(2))
    assert not torch.allclose(first["model_w"], second["model_w"])        # dropout on in the tuned UNet
    for key in ("ref_w", "ref_l"):
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7)
    assert all(not m.training for m in method.frozen.modules())
