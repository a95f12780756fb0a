"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and improving the training dynamics of
diffusion models", Sec. 2 and App. B, config G / Fig. 21), written from the paper.

Every layer keeps the expected magnitude of its activations: weights are normalised to unit norm per output channel
and scaled by 1/sqrt(fan_in) (Eq. 46-47; during training also forced back to unit norm, "forced weight
normalization"), SiLU is divided by 0.596 (Eq. 81), sums and concatenations are weighted to unit variance (Eq. 88,
103), the encoder blocks pixel-normalise their input, activations are clipped to [-256, 256]. No biases, no group
normalisation. The noise level enters through random Fourier features (magnitude preserving), the class through
a linear layer on one-hot labels (mixed 50/50 with the noise embedding); the output gain starts at zero.

ImageNet-64 (EDM2 Table 3): XS / S / M / L / XL have 128 / 192 / 256 / 320 / 384 base channels, multipliers
[1, 2, 3, 4], 3 blocks per resolution, attention at 16 and 8 px. Parameter names follow the published checkpoints.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import add_decoder_entry, decoder_bottleneck
from .pretrained import PretrainedMixin

SILU_GAIN = 0.596          # E[silu(x)^2]^(1/2) for x ~ N(0, 1) (Eq. 81)


def normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """x / (eps + ||x|| / sqrt(n)): unit root-mean-square over ``dim`` (default: all but the first; Eq. 47)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return F.silu(x) / SILU_GAIN


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a weighted sum of unit-variance inputs with unit variance (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation with the two parts weighted (1 - t) : t and the result kept at unit variance (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: Tensor, mode: str) -> Tensor:
    """2x average pooling ("down"), 2x nearest-neighbour upsampling ("up") or identity ("keep"): the [1, 1] filter."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features: sqrt(2) cos(x f + phi), f ~ N(0, 4 pi^2), phi ~ U(0, 2 pi)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return (torch.outer(x.float(), self.freqs.float()) + self.phases.float()).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` [kh, kw]) or linear layer (``kernel`` []), no bias.

    The weight [out, in, *kernel] is normalised per output channel and scaled by gain / sqrt(fan_in) at every call
    (Eq. 46-47); in training mode the stored weight is also reset to unit norm first (forced weight normalization).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder ("enc") or decoder ("dec") block (Fig. 21): resample, [enc: 1x1 skip conv, pixel norm], residual
    branch mp_silu -> conv3x3 -> modulate by (1 + gain * emb) -> mp_silu -> dropout -> conv3x3, mp_sum with weight
    ``res_balance``, then optional cosine attention (pixel-normalised q, k, v; mp_sum with ``attn_balance``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[int] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if list(resample_filter) != [1, 1]:
            raise ValueError(f"EDM2 Block: only resample_filter [1, 1] is supported, got {list(resample_filter)}")
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"EDM2 Block: flavor 'enc'|'dec', resample_mode 'keep'|'up'|'down'; got "
                             f"{flavor!r}, {resample_mode!r}")
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                                          # pixel norm
        y = self.conv_res0(mp_silu(x))
        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * modulation[:, :, None, None].to(y.dtype))
        y = self.conv_res1(F.dropout(y, p=self.dropout, training=self.training))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            qkv = self.attn_qkv(x)
            qkv = qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])
            q, k, v = normalize(qkv, dim=2).unbind(3)
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", weights, v)
            x = mp_sum(x, self.attn_proj(y.reshape(x.shape)), t=self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


class EDM2UNet(PretrainedMixin, nn.Module):
    """F(x, c_noise, class_labels) -> [B, img_channels, H, W] (the raw network inside the EDM preconditioning).

    Args:
        img_resolution, img_channels: image (or latent) size and channels.
        label_dim: classes (one-hot labels [B, label_dim]); 0 = unconditional.
        model_channels, channel_mult, num_blocks, attn_resolutions: widths and layout (Table 3).
        channel_mult_noise, channel_mult_emb: noise-feature / embedding widths (None: first / largest block width).
        label_balance: weight of the class embedding against the noise embedding (0.5).
        concat_balance: weight of the skip connection against the main path in the decoder (0.5).
        block_kwargs: ``Block`` options (dropout, res_balance, attn_balance, clip_act, channels_per_head).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        self.sample_shape = (img_channels, img_resolution, img_resolution)
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, [])
        self.emb_label = MPConv(label_dim, emb_channels, []) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1                                   # + a constant channel: the network's "bias"
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb_channels, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, "enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        self.bottleneck = decoder_bottleneck(img_resolution, len(widths))
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            add_decoder_entry(
                self.dec, res, cout, level == len(widths) - 1,
                lambda cin, out, up=False, attention=False: Block(cin, out, emb_channels, "dec", "up" if up else "keep",
                                                                  attention=attention, **block_kwargs))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, "dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] (already scaled by c_in), noise_labels [B] (c_noise), class_labels [B, label_dim]."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels.to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb).to(x.dtype)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
