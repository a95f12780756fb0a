"""Feature extractors: a picklable ``preprocess`` (uint8 images -> network input, runs in data-loader workers) and a
``network`` (network input -> [B, d] features). Built by name from a registry or wrapped around any ``nn.Module``.

    inception  clean-fid's Inception-v3 pool3 (2048-d); modes clean / legacy_tensorflow (see ``preprocess``)
    digits     the built-in digits CNN (64-d), inputs in [-1, 1], area-downsampled to 8x8; no download
    clip       an open_clip image tower (``fdistill.evaluation.clip``), inputs resized and normalised as CLIP wants
    nn.Module  any module, fed exactly what clean-fid feeds ``custom_feat_extractor``: [B, 3, 299, 299] in [0, 255]
               (clean) or the raw size (legacy_tensorflow), so values match ``cleanfid.fid.compute_fid``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .preprocess import inception_input


@dataclass
class FeatureExtractor:
    """``name`` (used in cache keys and statistics file names), ``network`` [B, *] -> [B, d], ``preprocess``."""
    name: str
    network: nn.Module
    preprocess: Callable[[Tensor], Tensor]

    @torch.no_grad()
    def features(self, network_input: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """Features [B, d] float32 on the CPU of a preprocessed batch."""
        return self.network(network_input.to(device)).float().reshape(network_input.shape[0], -1).cpu()

    def to(self, device) -> "FeatureExtractor":
        self.network.to(device)
        return self


class PooledPixelFeatures(nn.Module):
    """A cheap, fixed extractor for CPU tests and benchmarks: [B, 3, H, W] in [0, 255] -> [B, dim].

    Average-pools to ``pool`` x ``pool``, then applies a fixed random projection (seeded, N(0, 1) weights). Not a
    perceptual metric: it stands in for Inception where its weights cannot be downloaded.
    """

    def __init__(self, pool: int = 8, dim: int = 64, seed: int = 0):
        super().__init__()
        self.pool = pool
        self.project = nn.Linear(3 * pool * pool, dim)
        nn.init.normal_(self.project.weight, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.project.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.project(torch.nn.functional.adaptive_avg_pool2d(images / 255, self.pool).flatten(1))


def uint8_to_unit_range(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> float32 in [-1, 1] (inverse of ``quantize_to_uint8``)."""
    return (images.float() - 128) / 127.5


def _inception(mode: str = "clean", inception_weights=None, **_) -> FeatureExtractor:
    from .inception import InceptionFeatures

    network = InceptionFeatures(inception_weights, resize_inside=mode == "legacy_tensorflow")
    return FeatureExtractor("inception", network.eval(), functools.partial(inception_input, mode=mode))


def _digits(**_) -> FeatureExtractor:
    from .digits import digits_feature_extractor

    return FeatureExtractor("digits", digits_feature_extractor(), uint8_to_unit_range)


def _clip(clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai", **_) -> FeatureExtractor:
    from .clip import load_clip

    clip = load_clip(clip_model, clip_pretrained)
    return FeatureExtractor(f"clip_{clip.name}", clip.image_features_module(), clip.preprocess_uint8)


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {"inception": _inception, "digits": _digits, "clip": _clip}


def build_feature_extractor(features: str | nn.Module | FeatureExtractor = "inception", mode: str = "clean",
                            **options) -> FeatureExtractor:
    """A ``FeatureExtractor`` from a registry name (``EXTRACTORS``), any ``nn.Module``, or an extractor (returned).

    Options: ``inception_weights`` (path), ``clip_model`` / ``clip_pretrained`` (open_clip name or 'local-dir:...',
    and tag or weights file).
    """
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, nn.Module):
        return FeatureExtractor("custom", features.eval(), functools.partial(inception_input, mode=mode))
    if features not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {features!r}; allowed: {', '.join(EXTRACTORS)} or an nn.Module")
    return EXTRACTORS[features](mode=mode, **options)
