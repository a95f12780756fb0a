"""Networks fdistill trains itself: small Diffusers ``UNet2DModel`` presets and an MLP for point data, all
returned wrapped in EDM preconditioning (``fdistill.denoisers.EDMPrecond``, Karras et al. 2022 Eq. 7).

These factories are the ``_target_`` of ``conf/model/*.yaml`` and of a method's ``network`` spec
(``instantiate_network``). Class-conditional networks get
``num_class_embeds = num_classes + 1``: the extra row is the null class (label dropout, classifier-free guidance).
The UNets are plain Diffusers models: ``save_denoiser`` writes them with ``save_pretrained`` and Diffusers loads
them back with ``UNet2DModel.from_pretrained(dir, subfolder="unet")``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from fdistill.denoisers.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN
from fdistill.denoisers.edm import EDMPrecond

# The trained digits teacher shipped with the package (an fdistill model directory; scripts/train_digits_teacher.py)
DIGITS_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "digits_teacher"


def build_unet(resolution: int, channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
               attention_levels: tuple[int, ...] = (), num_classes: int | None = None, norm_num_groups: int = 32,
               attention_head_dim: int = 64, dropout: float = 0.0) -> UNet2DModel:
    """A Diffusers UNet2DModel: one resolution level per entry of ``block_out_channels`` (each but the last halves
    the resolution), self-attention at the levels listed in ``attention_levels`` (0 = full resolution)."""
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None (unconditional) or >= 1, got {num_classes}")
    if resolution % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^(levels - 1) = "
                         f"{2 ** (len(block_out_channels) - 1)} for block_out_channels={block_out_channels}")
    down = tuple("AttnDownBlock2D" if level in attention_levels else "DownBlock2D"
                 for level in range(len(block_out_channels)))
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels), down_block_types=down, up_block_types=up,
        norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim, dropout=dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1)


def tiny_unet(channels: int = 1, resolution: int = 8, num_classes: int | None = None, sigma_data: float = 0.5,
              dtype: torch.dtype | None = None) -> EDMPrecond:
    """A ~40k-parameter UNet (block_out_channels=(8, 16)) for tests: a forward pass takes milliseconds on CPU."""
    unet = build_unet(resolution, channels, (8, 16), layers_per_block=1, num_classes=num_classes,
                      norm_num_groups=4, attention_head_dim=8)
    return EDMPrecond(unet, sigma_data=sigma_data, dtype=dtype)


def digits_small_unet(num_classes: int | None = 10, resolution: int = 8, channels: int = 1, sigma_data: float = 0.5,
                      dtype: torch.dtype | None = None) -> EDMPrecond:
    """A ~178k-parameter UNet for the 8x8 digits, between ``tiny_unet`` and ``digits_unet``: two levels (8x8, 4x4)
    of 16 / 32 channels, attention at 4x4. The shipped digits teacher; a training step costs ~1.3x ``tiny_unet``'s."""
    unet = build_unet(resolution, channels, (16, 32), layers_per_block=1, attention_levels=(1,),
                      num_classes=num_classes, norm_num_groups=4, attention_head_dim=8)
    return EDMPrecond(unet, sigma_data=sigma_data, dtype=dtype)


def digits_unet(num_classes: int | None = 10, resolution: int = 8, channels: int = 1, sigma_data: float = 0.5,
                dtype: torch.dtype | None = None) -> EDMPrecond:
    """The UNet of the CPU benchmarks on sklearn digits (8x8, 1 channel, 10 classes); trains in minutes on CPU.
    Two levels (8x8, 4x4) of 32 / 64 channels, attention at 4x4."""
    unet = build_unet(resolution, channels, (32, 64), layers_per_block=1, attention_levels=(1,),
                      num_classes=num_classes, norm_num_groups=8, attention_head_dim=16)
    return EDMPrecond(unet, sigma_data=sigma_data, dtype=dtype)


def digits_teacher() -> nn.Module:
    """The trained class-conditional digits teacher shipped in ``fdistill/assets/digits_teacher`` (frozen, eval mode):
    a ``digits_small_unet`` trained by ``experiment=digits_teacher``; ``scripts/train_digits_teacher.py`` rebuilds it
    and records its steps, size and digits FD in ``record.json`` there. The main job (``experiment=digits_fdistill``)
    distils it, so its student and fake score start from trained weights, as in DMD2 and f-distill."""
    from fdistill.denoisers.io import load_denoiser

    return load_denoiser(DIGITS_TEACHER_DIR)[0]


def cifar10_unet(num_classes: int | None = None, sigma_data: float = 0.5, dropout: float = 0.13,
                 dtype: torch.dtype | None = None) -> EDMPrecond:
    """CIFAR-10 preset (32x32x3), sized like EDM's DDPM++ (channels 128-256-256-256, 2 blocks per level, attention at
    16x16, dropout 0.13 as EDM's CIFAR-10 setting)."""
    unet = build_unet(32, 3, (128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
                      num_classes=num_classes, dropout=dropout)
    return EDMPrecond(unet, sigma_data=sigma_data, dtype=dtype)


def imagenet64_unet(num_classes: int | None = 1000, sigma_data: float = 0.5, dropout: float = 0.1,
                    dtype: torch.dtype | None = None) -> EDMPrecond:
    """ImageNet-64 preset (64x64x3, class-conditional), sized like EDM's ADM configuration (channels 192-384-576-768,
    3 blocks per level, attention at 32, 16 and 8)."""
    unet = build_unet(64, 3, (192, 384, 576, 768), layers_per_block=3, attention_levels=(1, 2, 3),
                      num_classes=num_classes, dropout=dropout)
    return EDMPrecond(unet, sigma_data=sigma_data, dtype=dtype)


def instantiate_network(spec: Mapping[str, Any]) -> nn.Module:
    """The network of a method's ``network`` spec, ``{"_target_": "package.module.callable", **kwargs}`` (e.g.
    f-distill's student for an analytic teacher), built by Hydra's ``instantiate`` with plain-Python arguments, as
    the ``model`` group is. A target that cannot be imported or called raises a one-line ValueError naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(dict(spec), _convert_="all")
    except InstantiationException as error:
        reason = " ".join(str(error).split(", set env var HYDRA_FULL_ERROR")[0].split())  # Hydra's spans lines
        raise ValueError(f"method.network._target_ {spec.get('_target_')!r} cannot be imported or called: "
                         f"{reason}") from error


class MLPNetwork(ModelMixin, ConfigMixin):
    """Residual MLP F(x_in, timestep, class_labels) for point data [B, dim], with a sinusoidal noise embedding.

    A Diffusers ``ModelMixin`` so ``save_pretrained`` / ``from_pretrained`` (safetensors + config.json) work as for
    the UNets. ``num_class_embeds`` = classes + 1 (last row: null class) or None. The output layer starts at zero,
    so at initialisation the preconditioned denoiser is D(x) = c_skip x (the optimum for a delta at the origin).
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, embed_dim: int = 64,
                 num_class_embeds: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.noise_embedding = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """sample [B, dim], timestep [B] (float) -> [B, dim]."""
        embedding = self.noise_embedding(get_timestep_embedding(timestep, self.embed_dim).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("MLPNetwork is class-conditional: class_labels [B] are required")
            embedding = embedding + self.class_embedding(class_labels)
        hidden = self.input(sample)
        for block in self.blocks:
            hidden = hidden + block(hidden + embedding)
        return self.output(hidden)


class MLPDenoiser(EDMPrecond):
    """EDM-preconditioned ``MLPNetwork`` for point data [B, dim] (2-D mixtures of the f-distill / DDO benchmarks).

    Args:
        dim: data dimension. hidden, depth, embed_dim: network width, residual blocks, noise-embedding size.
        num_classes: None (unconditional) or the number of classes (null class = num_classes).
        sigma_data: data standard deviation; sigma_min / sigma_max: noise range for samplers.
    ``features`` reads the middle residual block ([B, hidden]).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, embed_dim: int = 64,
                 num_classes: int | None = None, sigma_data: float = 0.5, sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        net = MLPNetwork(dim=dim, hidden=hidden, depth=depth, embed_dim=embed_dim,
                         num_class_embeds=None if num_classes is None else num_classes + 1)
        super().__init__(net, sigma_data=sigma_data, feature_block=f"blocks.{depth // 2}",
                         sigma_min=sigma_min, sigma_max=sigma_max)
