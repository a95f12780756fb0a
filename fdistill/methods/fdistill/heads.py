"""f-distill's discriminator: a trained head on the features of a noisy sample (the frozen teacher's or the fake
score's ``features(x_t, sigma, cond)``), or on its own small feature net for feature sources without one."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...denoisers.base import append_dims


class NoisyInputFeatures(nn.Module):
    """A small feature net on (x, sigma) for teachers without ``features`` (analytic ones).

    [B, *shape] x, [B] sigma -> [B, width]: an MLP on [x / sqrt(sigma^2 + sigma_data^2) flattened, log(sigma) / 4]
    (EDM's c_in and c_noise, so the input has unit variance at every noise level)."""

    def __init__(self, sample_numel: int, width: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.mlp = nn.Sequential(nn.Linear(sample_numel + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_in = append_dims(1.0 / torch.sqrt(sigma ** 2 + self.sigma_data ** 2), x.ndim)
        inputs = torch.cat([(c_in * x).flatten(1), sigma.log()[:, None] / 4], dim=1)
        return self.mlp(inputs.float())


class DiscriminatorHead(nn.Module):
    """Logit [B] from features: [B, C, h, w] (1x1 conv), [B, N, D] tokens or [B, F] vectors (linear), then SiLU,
    a mean over positions and an MLP. With ``num_classes`` > 0, a projection term <embed(label), pooled> (Miyato &
    Koyama 2018) makes the logit class-conditional, so r estimates p(x | c) / q(x | c)."""

    def __init__(self, feature_shape: tuple[int, ...], width: int = 64, num_classes: int = 0):
        super().__init__()
        channels = feature_shape[0]
        self.spatial = len(feature_shape) == 3
        self.lift = nn.Conv2d(channels, width, 1) if self.spatial else nn.Linear(feature_shape[-1], width)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes > 0 else None

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        lifted = self.lift(features.float())
        pooled = lifted.mean(dim=(2, 3)) if self.spatial else (lifted.mean(1) if lifted.ndim == 3 else lifted)
        hidden = self.mlp(pooled)
        logit = self.out(hidden)[:, 0]
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * hidden).sum(1)
        return logit


class Discriminator(nn.Module):
    """The trained part of the discriminator: a head and, for feature sources without ``features``, a backbone."""

    def __init__(self, head: DiscriminatorHead, backbone: NoisyInputFeatures | None = None):
        super().__init__()
        self.head = head
        self.backbone = backbone


def build_discriminator(feature_source: nn.Module, sample_shape: tuple[int, ...], width: int, sigma_data: float,
                        num_classes: int, device: torch.device) -> Discriminator:
    """A discriminator whose head fits the features of ``feature_source`` (probed on one zero sample at sigma 1);
    a ``NoisyInputFeatures`` backbone when the source has no ``features`` method (analytic teachers)."""
    backbone = None
    if not callable(getattr(feature_source, "features", None)):
        backbone = NoisyInputFeatures(math.prod(sample_shape), width, sigma_data)
    probe_x = torch.zeros(1, *sample_shape, device=device)
    probe_sigma = torch.ones(1, device=probe_x.device)
    with torch.no_grad():
        probe_cond = torch.zeros(1, dtype=torch.long, device=probe_x.device) if num_classes else None
        if backbone is not None:
            feats = backbone(probe_x, probe_sigma)
        else:
            feats = feature_source.features(probe_x, probe_sigma, probe_cond)
    return Discriminator(DiscriminatorHead(tuple(feats.shape[1:]), width, num_classes), backbone)


def class_labels(cond: Any) -> Tensor | None:
    """The class labels [B] (long) in a condition, None for other conditions (text embeddings, None)."""
    return cond if isinstance(cond, Tensor) and cond.dtype == torch.long and cond.ndim == 1 else None
