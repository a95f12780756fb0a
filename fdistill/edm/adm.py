"""ADM, the ImageNet U-Net of Dhariwal & Nichol 2021 ("Diffusion models beat GANs", Sec. 3 and App. A), as configured
by EDM for class-conditional ImageNet-64 (Karras et al. 2022, App. F.2, Table 7): 192 base channels, multipliers
[1, 2, 3, 4] (64, 32, 16, 8 px), 3 blocks per resolution, attention at 32, 16 and 8 px with 64 channels per head,
adaptive group normalisation (scale and shift from the embedding), BigGAN-style up/down residual blocks, dropout
0.10, class embedding added to the noise embedding. About 296 M parameters (EDM Table 7).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, add_decoder_entry, decoder_bottleneck
from .pretrained import PretrainedMixin


class DhariwalUNet(PretrainedMixin, nn.Module):
    """F(x, c_noise, class_labels) -> [B, out_channels, H, W] (the raw network inside a preconditioning).

    Args:
        img_resolution, in_channels, out_channels: image size and channels.
        label_dim: classes (one-hot labels [B, label_dim]); 0 = unconditional.
        augment_dim: augmentation-label size (0 = none).
        model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout: as ADM.
        label_dropout: training probability of replacing a label by the all-zero (null) vector.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        self.sample_shape = (in_channels, img_resolution, img_resolution)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        self.bottleneck = decoder_bottleneck(img_resolution, len(channel_mult))
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            add_decoder_entry(self.dec, res, cout, level == len(channel_mult) - 1,
                                           lambda cin, out, **kw: UNetBlock(cin, out, **block, **kw))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)
        nn.init.zeros_(self.out_conv.weight)                                  # the network starts at F = 0

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        """The conditioning embedding [B, emb_channels]; ADM adds the class embedding after the noise MLP."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] (already scaled by c_in), noise_labels [B] (c_noise), class_labels [B, label_dim]."""
        emb = self.embed(noise_labels, class_labels, augment_labels).to(x.dtype)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
