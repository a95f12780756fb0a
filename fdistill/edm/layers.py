"""Building blocks of the EDM (Karras et al. 2022, App. F.2) networks: DDPM++ / NCSN++ (Song et al. 2021) and ADM
(Dhariwal & Nichol 2021), written from the papers.

Parameter and buffer names follow the published EDM checkpoints (``weight``, ``bias``, ``resample_filter``,
``freqs``; block parts ``norm0 conv0 affine norm1 conv1 skip norm2 qkv proj``) so that ``scripts/convert_edm.py``
maps a checkpoint onto these modules name for name. Shapes: images [B, C, H, W], embeddings [B, C_emb].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Module):
    """y = x W^T + b with ``weight`` [out, in] and optional ``bias`` [out] (the checkpoints' layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def resample_kernel(taps: Sequence[float]) -> Tensor:
    """The separable FIR filter outer(f, f) / sum(f)^2 as [1, 1, k, k]: [1, 1] is a 2x2 box (average pooling /
    nearest upsampling), [1, 3, 3, 1] the binomial filter of NCSN++ (Song et al. 2021, after StyleGAN2)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """3x3 / 1x1 convolution with an optional 2x FIR down- or upsampling (``kernel=0``: resampling only).

    Downsampling filters then subsamples by 2; upsampling inserts zeros (transposed convolution, stride 2) and
    filters with 4 * kernel so a constant image keeps its value. ``fused_resample`` applies the convolution before
    the downsampling (NCSN++'s residual input branch); ``resample_filter`` is a buffer as in the checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False):
        super().__init__()
        if (up and down) or (fused_resample and not down):
            raise ValueError(f"Conv2d: up and down are exclusive and fused_resample needs down; got up={up}, "
                             f"down={down}, fused_resample={fused_resample}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if self.weight is not None:
            nn.init.xavier_uniform_(self.weight)
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def _filter(self, x: Tensor, up: bool, padding: int) -> Tensor:
        channels = x.shape[1]
        f = self.resample_filter.to(x.dtype)
        if up:
            return F.conv_transpose2d(x, (4 * f).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)
        return F.conv2d(x, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and self.down and w is not None:
            x = self._filter(F.conv2d(x, w, padding=w_pad + f_pad), up=False, padding=0)
        else:
            if self.up or self.down:
                x = self._filter(x, up=self.up, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.GroupNorm):
    """Group normalisation with min(32, C // 4) groups (at least 4 channels per group, as the EDM networks)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__(min(num_groups, num_channels // min_channels_per_group), num_channels, eps=eps)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar [B] -> [B, C]: [cos(x w_i), sin(x w_i)], w_i = 10000^(-i/n),
    i = 0..n-1 (n = C/2; ``endpoint``: i / (n-1), so the last frequency is exactly 1/10000)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(x.float(), (1.0 / self.max_positions) ** exponents)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++, Song et al. 2021): [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x.float(), 2 * math.pi * self.freqs.float())
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with noise-embedding conditioning and optional self-attention (DDPM++ / NCSN++ / ADM).

    x -> GN, SiLU, conv (with up/down) -> + affine(emb) (``adaptive_scale``: GN(h) * (1 + scale) + shift, ADM's
    AdaGN) -> GN, SiLU, dropout, conv -> (+ skip(x)) * skip_scale, then attention (GN, 1x1 qkv, softmax(q k^T /
    sqrt(d)) v, 1x1 proj, residual) * skip_scale. The skip is a 1x1 conv when channels change (or a resampling;
    ``resample_proj``: a 1x1 conv with it).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(residual) if self.skip is not None else residual)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attend(self.qkv(self.norm2(x)))) + x) * self.skip_scale
        return x

    def _attend(self, qkv: Tensor) -> Tensor:
        """Multi-head self-attention over positions; qkv [B, 3C, H, W] with channels ordered (head, c, q/k/v)."""
        batch, channels3, height, width = qkv.shape
        q, k, v = qkv.reshape(batch * self.num_heads, channels3 // (3 * self.num_heads), 3, -1).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(q.shape[1])).softmax(dim=2)
        out = torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v)
        return out.reshape(batch, channels3 // 3, height, width)


def decoder_bottleneck(img_resolution: int, num_levels: int) -> str:
    """Module name of the EDM networks' bottleneck: the lowest resolution's ``in1`` block (``add_decoder_entry``)."""
    res = img_resolution >> (num_levels - 1)
    return f"dec.{res}x{res}_in1"


def add_decoder_entry(dec: nn.ModuleDict, res: int, channels: int, lowest: bool, make_block) -> None:
    """The first decoder blocks at resolution ``res`` in the EDM networks' layout (DDPM++, ADM, EDM2; EDM App. F.3,
    EDM2 Fig. 21): at the lowest resolution ``in0`` (with attention) and ``in1`` at ``channels`` width, whose output
    is the bottleneck (``decoder_bottleneck``); elsewhere one upsampling block ``up``.
    ``make_block(in, out, attention=..., up=...)`` builds one block."""
    if not lowest:
        dec[f"{res}x{res}_up"] = make_block(channels, channels, up=True)
        return
    dec[f"{res}x{res}_in0"] = make_block(channels, channels, attention=True)
    dec[f"{res}x{res}_in1"] = make_block(channels, channels)
