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
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .clip import CLIP_MODEL, CLIP_PRETRAINED
from .preprocess import inception_input


@dataclass
class FeatureExtractor:
    """``name`` (used in cache keys and statistics file names), ``network`` [B, *] -> [B, d], ``preprocess``.

    ``weights_id`` identifies the network's weights in cache keys (a content hash, or a published pretrained tag);
    ``weights_note`` says in words which weights are used (printed by ``fdistill fid``).
    """
    name: str
    network: nn.Module
    preprocess: Callable[[Tensor], Tensor]
    weights_id: str = ""
    weights_note: str = ""

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


def uint8_to_digit_grid(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] of any size -> the digits network's input [B, 1, 8, 8] in [-1, 1] (fixed size, so images
    of mixed sizes can share a batch)."""
    from .digits import to_digit_grid

    return to_digit_grid(uint8_to_unit_range(images))


def describe_preprocess(preprocess: Callable) -> str:
    """A stable text of a preprocessing function and its bound options (for cache keys; no memory addresses)."""
    if isinstance(preprocess, functools.partial):
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(preprocess.keywords.items()))
        return f"{describe_preprocess(preprocess.func)}({options})"
    return f"{getattr(preprocess, '__module__', '?')}.{getattr(preprocess, '__qualname__', type(preprocess).__name__)}"


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes of every tensor, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _inception(mode: str = "clean", inception_weights=None, **_) -> FeatureExtractor:
    from .inception import InceptionFeatures

    network = InceptionFeatures(inception_weights, resize_inside=mode == "legacy_tensorflow")
    return FeatureExtractor("inception", network.eval(), functools.partial(inception_input, mode=mode),
                            f"sha256:{network.weights.sha256}", network.weights.describe())


def _digits(**_) -> FeatureExtractor:
    from .digits import WEIGHTS_PATH, digits_feature_extractor

    network = digits_feature_extractor()
    return FeatureExtractor("digits", network, uint8_to_digit_grid, f"sha256:{state_dict_sha256(network)}",
                            f"{WEIGHTS_PATH} (shipped with fdistill)")


def clip_weights_id(clip_model: str, clip_pretrained: str | None, network: nn.Module) -> str:
    """open_clip's model name and pretrained tag when the tag names published weights; otherwise (a weights file,
    local-dir:, hf-hub:) the SHA-256 of the loaded weights, so other weights under the same name never match."""
    import open_clip

    if clip_pretrained and clip_pretrained in open_clip.list_pretrained_tags_by_model(clip_model):
        return f"open_clip:{clip_model}:{clip_pretrained}"
    return f"sha256:{state_dict_sha256(network)}"


def _clip(clip_model: str = CLIP_MODEL, clip_pretrained: str | None = CLIP_PRETRAINED, **_) -> FeatureExtractor:
    from .clip import load_clip

    clip = load_clip(clip_model, clip_pretrained)
    weights_id = clip_weights_id(clip_model, clip_pretrained, clip.model)
    return FeatureExtractor(f"clip_{clip.name}", clip.image_features_module(), clip.preprocess_uint8, weights_id,
                            f"open_clip {clip_model}, pretrained {clip_pretrained} ({weights_id})")


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
