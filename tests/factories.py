"""The tests' tiny models, in one place: Diffusers networks built from config (UNet2DModel, UNet2DConditionModel with
SDXL conditioning, DiT), narrow versions of the published SD layouts, and small methods for the trainer's tests.
Tiny Stable Diffusion pipelines come from the package (``fdistill.pipelines.tiny_sd_components``) and tiny EDM UNets
from ``fdistill.networks.tiny_unet``; this module holds only what the package does not."""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from fdistill import architectures

TEXT_DIM = 8                     # width of tiny_unet2d_condition's text embeddings


def tiny_unet2d(out_channels: int = 2, num_class_embeds: int | None = None, sample_size: int = 8,
                in_channels: int = 2, block_out_channels: tuple[int, ...] = (4, 8),
                norm_num_groups: int = 2) -> UNet2DModel:
    """A Diffusers UNet2DModel with two plain down / up blocks ([B, in_channels, sample_size, sample_size])."""
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=block_out_channels, norm_num_groups=norm_num_groups,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       attention_head_dim=4, num_class_embeds=num_class_embeds)


def tiny_unet2d_condition(sdxl: bool = False) -> UNet2DConditionModel:
    """A text-conditioned UNet (cross-attention width TEXT_DIM; ``sdxl``: SDXL's added text / time conditioning)."""
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + TEXT_DIM) if sdxl else {}
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(4, 8), norm_num_groups=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=TEXT_DIM, attention_head_dim=2, **extra)


def tiny_dit(learned_sigma: bool = True, num_classes: int = 5) -> DiTTransformer2DModel:
    """A class-conditional DiT on 2-channel 8x8 inputs (``learned_sigma``: twice the output channels)."""
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2,
                                 out_channels=4 if learned_sigma else 2, num_layers=2, norm_num_groups=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)


def small_sd_architecture(kind: str) -> dict:
    """The published SD layouts (block types, SDXL's added conditioning) with narrow channels."""
    unet = dict(architectures.SD15_UNET, block_out_channels=(32, 64, 64, 64), attention_head_dim=4,
                norm_num_groups=8, cross_attention_dim=64)
    if kind == "sdxl":
        unet = dict(architectures.SDXL_UNET, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                    transformer_layers_per_block=(1, 1, 1), norm_num_groups=8, cross_attention_dim=128,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 64)
    text = dict(architectures.CLIP_L_TEXT, hidden_size=64, intermediate_size=64, num_attention_heads=2,
                num_hidden_layers=2, projection_dim=64)
    parts = {"unet": unet, "vae": dict(architectures.SD15_VAE, block_out_channels=(8,) * 4, norm_num_groups=4),
             "text_encoder": text}
    return {**parts, "text_encoder_2": text} if kind == "sdxl" else parts


def tiny_denoising_method(max_grad_norm: float | None = None, lr: float = 1e-2):
    """A denoising method with a small EDM-preconditioned MLP (same weights in every process: seeded)."""
    from fdistill.methods.denoising import Denoising, DenoisingConfig
    from fdistill.networks import MLPDenoiser

    torch.manual_seed(0)
    network = MLPDenoiser(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(network.net.output[-1].weight, std=0.1)  # non-zero output layer: every weight gets a gradient
    return Denoising(DenoisingConfig(lr=lr, max_grad_norm=max_grad_norm), network, (2,))


def probe_method(nan_at: int | None = None):
    from fdistill.methods.base import Method, Phase

    class Probe(Method):
        """A student regressed onto a frozen teacher; its first layer is frozen inside the trained network (like a
        LoRA base weight); from step ``nan_at`` on the loss is NaN."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.networks["student"] = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
            self.networks["student"][0].requires_grad_(False)
            self.frozen["teacher"] = nn.Linear(2, 2).requires_grad_(False)

        def phases(self):
            return [Phase("student", ("student",), lr=1e-2, weight_decay=0.5)]  # decay would move frozen weights

        def loss(self, phase, item, ctx):
            x = item["x"]
            loss = (self.networks["student"](x) - self.frozen["teacher"](x)).pow(2).mean()
            if nan_at is not None and ctx.step >= nan_at:
                loss = loss * float("nan")
            return loss, {"probe": 1.0}

        def generate(self, num, generator=None, cond=None):
            return self.networks["student"](torch.randn(num, 2, generator=generator))

    return Probe()
