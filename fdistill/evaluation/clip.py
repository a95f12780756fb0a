"""CLIP score and CLIP image features (for CLIP-feature FID) with open_clip.

Models load with ``open_clip.create_model(name, pretrained=tag_or_file)``: a built-in name with a pretrained tag or a
local weights file (e.g. ``ViT-B-32`` + ``openai``), ``local-dir:/path`` (``open_clip_config.json`` + weights) or
``hf-hub:org/repo``. Preprocessing runs on tensors: bicubic resize of the short side (antialiased) to the model's
image size, centre crop, normalisation with the model's mean / std (open_clip does the same with PIL; values differ
by resampling round-off only).

CLIP score (Hessel et al. 2021, Eq. 1 with w = 100, the torchmetrics convention): 100 * max(cos(E_img, E_txt), 0),
averaged over image-caption pairs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .preprocess import quantize_to_uint8

CLIP_MODEL = "ViT-B-32"         # the default open_clip model of CLIP scores and CLIP features
CLIP_PRETRAINED = "openai"      # ... and its pretrained tag

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, C, H, W] -> float32 [B, 3, size, size] normalised CLIP input (short side resize + centre crop)."""
    images = images.float() / 255
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    images = F.interpolate(images[:, :3], size=resized, mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    images = images[:, :, top:top + size, left:left + size].clamp(0, 1)
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class _ImageTower(nn.Module):
    """nn.Module view of ``model.encode_image`` (unnormalised embeddings [B, d], as CLIP-FID uses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer and preprocessing parameters."""
    name: str
    model: nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @property
    def preprocess_uint8(self):
        """Picklable uint8 -> CLIP input function (runs in data-loader workers)."""
        return functools.partial(clip_preprocess, size=self.image_size, mean=self.mean, std=self.std)

    def image_features_module(self) -> nn.Module:
        return _ImageTower(self.model)

    @torch.no_grad()
    def input_embeddings(self, pixels: Tensor) -> Tensor:
        """Unit-norm embeddings [B, d] of CLIP input [B, 3, S, S] (``preprocess_uint8``'s output)."""
        device = next(self.model.parameters()).device
        return F.normalize(self.model.encode_image(pixels.to(device)).float(), dim=-1).cpu()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm embeddings [B, d] of images [B, C, H, W] in [-1, 1]."""
        return self.input_embeddings(self.preprocess_uint8(quantize_to_uint8(images.cpu())))

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> Tensor:
        """Unit-norm embeddings [B, d] of captions."""
        device = next(self.model.parameters()).device
        return F.normalize(self.model.encode_text(self.tokenizer(captions).to(device)).float(), dim=-1).cpu()


def _image_size(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_clip(model_name: str = CLIP_MODEL, pretrained: str | None = CLIP_PRETRAINED, device="cpu",
              load_weights: bool = True) -> ClipModel:
    """Load an open_clip model (see module docstring); eval mode, frozen. ``load_weights=False``: the architecture
    only (random init, also for ``local-dir:``), for weights loaded afterwards from a fine-tuned checkpoint."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, load_weights=load_weights,
                                   device=device).eval().requires_grad_(False)
    config = getattr(model.visual, "preprocess_cfg", {}) or {}
    name = model_name.split(":")[-1].rstrip("/").split("/")[-1].lower().replace("-", "_")
    return ClipModel(name, model, open_clip.get_tokenizer(model_name), _image_size(model),
                     tuple(config.get("mean", OPENAI_MEAN)), tuple(config.get("std", OPENAI_STD)))


def clip_score(images: Tensor, captions: list[str], clip: ClipModel, batch_size: int = 64) -> float:
    """Mean CLIP score 100 * max(cos, 0) of images [B, C, H, W] in [-1, 1] against their captions (len B)."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"clip_score needs one caption per image: {images.shape[0]} images, {len(captions)} captions")
    scores = [pair_scores(clip.image_embeddings(images[start:start + batch_size]),
                          clip.text_embeddings(captions[start:start + batch_size]))
              for start in range(0, len(captions), batch_size)]
    return float(torch.cat(scores).mean())


def pair_scores(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """CLIP scores [B] = 100 * max(cos, 0) of unit-norm image and text embeddings [B, d] (Hessel et al. Eq. 1)."""
    return 100 * (image_embeddings * text_embeddings).sum(-1).clamp_min(0)
