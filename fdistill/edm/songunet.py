"""DDPM++ and NCSN++ (Song et al. 2021, "Score-based generative modeling through SDEs", App. H) as configured by
EDM (Karras et al. 2022, App. F.2 and Table 7): one U-Net class, the two architectures differing in the noise
embedding (positional / random Fourier), the encoder (standard / residual input pyramid) and the resampling filter
([1, 1] box / [1, 3, 3, 1] binomial).

EDM's CIFAR-10 settings: 128 base channels, multipliers [2, 2, 2] (32, 16, 8 px), 4 blocks per resolution, attention
at 16 px, embedding 4 x 128, dropout 0.13, skip scale 1/sqrt(2), GroupNorm eps 1e-6, and a 9-dimensional
augmentation label (non-leaking augmentation, zero at sampling). About 56 M parameters (EDM Table 7).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from .layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
                     add_decoder_entry, decoder_bottleneck)
from .pretrained import PretrainedMixin

EMBEDDINGS = ("positional", "fourier")
ENCODERS = ("standard", "skip", "residual")
DECODERS = ("standard", "skip")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"SongUNet: {name} must be one of {list(allowed)}, got {value!r}")


class SongUNet(PretrainedMixin, nn.Module):
    """F(x, c_noise, class_labels) -> [B, out_channels, H, W] (the raw network inside a preconditioning).

    Args:
        img_resolution, in_channels, out_channels: image size and channels.
        label_dim: classes (one-hot labels [B, label_dim]); 0 = unconditional.
        augment_dim: augmentation-label size (0 = none).
        model_channels, channel_mult, channel_mult_emb, channel_mult_noise, num_blocks, attn_resolutions, dropout:
            widths (base x multiplier per resolution), embedding widths, blocks per resolution, attention sizes.
        label_dropout: training probability of replacing a label by the all-zero (null) vector, for guidance.
        embedding_type: "positional" (DDPM++) or "fourier" (NCSN++).
        encoder_type: "standard" (DDPM++), "skip" or "residual" (NCSN++: the input image downsampled alongside).
        decoder_type: "standard" or "skip" (an output pyramid summed across resolutions).
        resample_filter: FIR taps of the up/downsampling, [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        self.sample_shape = (in_channels, img_resolution, img_resolution)
        for name, value, allowed in (("embedding_type", embedding_type, EMBEDDINGS),
                                     ("encoder_type", encoder_type, ENCODERS), ("decoder_type", decoder_type, DECODERS)):
            _check_choice(name, value, allowed)
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [getattr(b, "out_channels") for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        self.bottleneck = decoder_bottleneck(img_resolution, len(channel_mult))
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            add_decoder_entry(self.dec, res, cout, level == len(channel_mult) - 1,
                                           lambda cin, out, **kw: UNetBlock(cin, out, **block, **kw))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)
                nn.init.zeros_(self.dec[f"{res}x{res}_aux_conv"].weight)   # the network starts at F = 0

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        """The conditioning embedding [B, emb_channels] of noise level, class and augmentation labels."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)     # [sin, cos] order of DDPM++
        if self.map_label is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] (already scaled by c_in), noise_labels [B] (c_noise), class_labels [B, label_dim]."""
        emb = self.embed(noise_labels, class_labels, augment_labels).to(x.dtype)
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = hidden = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                hidden = block(x)
            elif "aux_conv" in name:
                hidden = block(F.silu(hidden))
                aux = hidden if aux is None else hidden + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
