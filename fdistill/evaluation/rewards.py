"""Reward models that score generated images against their prompts (Diffusion-DPO evaluation, Wallace et al. 2023,
Sec. 5: PickScore win rates and CLIP scores of base vs tuned samples).

A scorer is ``score(images, prompts) -> Tensor [N]`` with images [N, 3, H, W] in [-1, 1] (one prompt per image);
higher is better. ``build_scorer(name, model=..., processor=..., device=...)`` builds one from the registry
``SCORERS``:

- ``clip``: CLIP score (Hessel et al. 2021, Eq. 1, w = 100) per image, 100 * max(cos(E_img, E_txt), 0), with an
  open_clip model (``fdistill.evaluation.clip.load_clip``). ``model`` is an open_clip name (default ``ViT-B-32``),
  ``local-dir:/path`` or ``hf-hub:org/repo``; ``processor`` the pretrained tag or weights file (default
  ``openai``; ignored for ``local-dir:`` / ``hf-hub:``).
- ``pickscore``: PickScore_v1 (Kirstain et al. 2023): a transformers ``CLIPModel`` fine-tuned on Pick-a-Pic;
  score = exp(logit_scale) * cos(E_img, E_txt) (the model's logit for the image-prompt pair). ``model`` is a hub
  id or local directory (default ``yuvalkirstain/PickScore_v1``), ``processor`` the ``AutoProcessor`` (default
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).

HPSv2 and the LAION aesthetic predictor are not included (they need their own packages / head weights).
Weights come from the hub or a local path; when they cannot be loaded (offline, missing) the error names the model
id and how to pass a local copy.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .preprocess import quantize_to_uint8

Scorer = Callable[[Tensor, list[str]], Tensor]


def _check_pairs(images: Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or len(prompts) != images.shape[0]:
        raise ValueError(f"a reward scorer needs images [N, 3, H, W] and one prompt per image: got images of shape "
                         f"{tuple(images.shape)} and {len(prompts)} prompts")


def _load_error(what: str, model_id: str, option: str, error: Exception) -> OSError:
    return OSError(f"could not load the {what} {model_id!r} ({type(error).__name__}: {error}). Without internet, "
                   f"download it elsewhere and pass its local path as {option}")


def clip_scorer(model: str | None = None, processor: str | None = None, device: str | torch.device = "cpu",
                batch_size: int = 64) -> Scorer:
    """CLIP score per image: 100 * max(cos(E_img, E_txt), 0) (Hessel et al. 2021, Eq. 1), [N] float32."""
    from .clip import load_clip

    model = model or "ViT-B-32"
    pretrained = None if model.startswith(("local-dir:", "hf-hub:")) else (processor or "openai")
    try:
        clip = load_clip(model, pretrained, device=device)
    except (OSError, RuntimeError, ValueError) as error:
        raise _load_error("open_clip model", f"{model} ({pretrained})", "model='local-dir:/path' "
                          "(open_clip_config.json + weights) or processor='/path/to/weights.bin'", error) from error

    def score(images: Tensor, prompts: list[str]) -> Tensor:
        _check_pairs(images, prompts)
        scores = [100 * (clip.image_embeddings(images[i:i + batch_size]) *
                         clip.text_embeddings(prompts[i:i + batch_size])).sum(-1).clamp_min(0)
                  for i in range(0, len(prompts), batch_size)]
        return torch.cat(scores)

    return score


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore_scorer(model: str | None = None, processor: str | None = None, device: str | torch.device = "cpu",
                     batch_size: int = 16) -> Scorer:
    """PickScore per image: exp(logit_scale) * cos(E_img, E_txt) of a transformers CLIPModel, [N] float32."""
    from transformers import AutoProcessor, CLIPModel

    model_id, processor_id = model or PICKSCORE_MODEL, processor or PICKSCORE_PROCESSOR
    try:
        clip = CLIPModel.from_pretrained(model_id).to(device).eval().requires_grad_(False)
    except (OSError, ValueError) as error:
        raise _load_error("PickScore model", model_id, "model='/path/to/PickScore_v1' (--scorer-model)",
                          error) from error
    try:
        preprocess = AutoProcessor.from_pretrained(processor_id)
    except (OSError, ValueError) as error:
        raise _load_error("PickScore processor", processor_id, "processor='/path/to/processor' (--scorer-processor)",
                          error) from error

    @torch.no_grad()
    def score_batch(images: Tensor, prompts: list[str]) -> Tensor:
        pixels = [image.permute(1, 2, 0).numpy() for image in quantize_to_uint8(images.cpu())]
        inputs = preprocess(images=pixels, text=prompts, padding=True, truncation=True, return_tensors="pt")
        outputs = clip(**{k: v.to(device) for k, v in inputs.items()})
        cosine = (F.normalize(outputs.image_embeds.float(), dim=-1) *
                  F.normalize(outputs.text_embeds.float(), dim=-1)).sum(-1)
        return (clip.logit_scale.exp().float() * cosine).cpu()

    def score(images: Tensor, prompts: list[str]) -> Tensor:
        _check_pairs(images, prompts)
        return torch.cat([score_batch(images[i:i + batch_size], prompts[i:i + batch_size])
                          for i in range(0, len(prompts), batch_size)])

    return score


SCORERS: dict[str, Callable[..., Scorer]] = {"clip": clip_scorer, "pickscore": pickscore_scorer}


def build_scorer(name: str, model: str | None = None, processor: str | None = None,
                 device: str | torch.device = "cpu") -> Scorer:
    """The scorer ``name`` of ``SCORERS`` with its weights (hub id / local path ``model``, and ``processor``:
    the open_clip pretrained tag for 'clip', the AutoProcessor id or path for 'pickscore'; None = the defaults)."""
    if name not in SCORERS:
        raise ValueError(f"unknown reward scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name](model=model, processor=processor, device=device)


def win_rate(scores: Tensor, baseline_scores: Tensor) -> float:
    """Share of paired samples (same prompt, same noise) where ``scores`` beat ``baseline_scores``; ties count 1/2."""
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"win_rate needs paired scores of one shape, got {tuple(scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}")
    return ((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean().item()
