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
- ``hpsv2``: Human Preference Score v2 (Wu et al. 2023): an open_clip ViT-H-14 whose weights are all replaced by
  the HPSv2 checkpoint (fine-tuned on HPD v2); score = 100 * cos(E_img, E_txt), not clamped. The x100 scale is the
  one papers report ("HPSv2 28.16" = cosine 0.2816; the released ``hpsv2.score`` returns the bare cosine).
  ``model`` is the checkpoint: a local path, ``org/repo/file`` on the hub or a file name in ``xswu/HPSv2``
  (default ``HPS_v2_compressed.pt`` = v2.0, the version out when the Diffusion-DPO paper reported HPSv2;
  ``HPS_v2.1_compressed.pt`` = v2.1).
  ``processor`` is the open_clip architecture (default ``ViT-H-14``; ``local-dir:/path`` works too).
- ``aesthetic``: the LAION improved aesthetic predictor (Schuhmann et al., the LAION-5B aesthetic filter): a linear
  MLP (``AestheticHead``) on the L2-normalised CLIP ViT-L/14 (OpenAI) image embedding, trained to regress
  SAC + LOGOS + AVA ratings, so scores are roughly 1..10; the prompt is ignored. ``model`` is the head's state dict
  (local path, ``org/repo/file`` or a file name in ``camenduru/improved-aesthetic-predictor``; default
  ``sac+logos+ava1-l14-linearMSE.pth``); ``processor`` the open_clip CLIP (default ``ViT-L-14`` with the
  ``openai`` weights; ``local-dir:/path`` or ``hf-hub:timm/vit_large_patch14_clip_224.openai`` load without a tag).

Weights come from the hub or a local path; when they cannot be loaded (offline, missing) the error names the model
id and how to pass a local copy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIP_MODEL, CLIP_PRETRAINED, ClipModel, load_clip
from .preprocess import quantize_to_uint8

Scorer = Callable[[Tensor, list[str]], Tensor]


def _check_pairs(images: Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or len(prompts) != images.shape[0]:
        raise ValueError(f"a reward scorer needs images [N, 3, H, W] and one prompt per image: got images of shape "
                         f"{tuple(images.shape)} and {len(prompts)} prompts")


def _load_error(what: str, model_id: str, option: str, error: Exception) -> OSError:
    return OSError(f"could not load the {what} {model_id!r} ({type(error).__name__}: {error}). Without internet, "
                   f"download it elsewhere and pass its local path as {option}")


def _batched(score_batch: Scorer, batch_size: int) -> Scorer:
    """A scorer that checks its input and runs ``score_batch`` on chunks of ``batch_size`` image-prompt pairs."""
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        _check_pairs(images, prompts)
        return torch.cat([score_batch(images[i:i + batch_size], prompts[i:i + batch_size])
                          for i in range(0, len(prompts), batch_size)])

    return score


def _load_open_clip(model_name: str, pretrained: str | None, device: str | torch.device, option: str,
                    load_weights: bool = True) -> ClipModel:
    """``load_clip`` whose load failure names the model and the local-copy ``option``."""
    try:
        return load_clip(model_name, pretrained, device=device, load_weights=load_weights)
    except (OSError, RuntimeError, ValueError) as error:
        raise _load_error("open_clip model", f"{model_name} ({pretrained})", option, error) from error


def _cosine(clip: ClipModel, images: Tensor, prompts: list[str]) -> Tensor:
    """cos(E_img, E_txt) [N] of paired images [N, 3, H, W] in [-1, 1] and prompts (unit-norm CLIP embeddings)."""
    return (clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1)


def clip_scorer(model: str | None = None, processor: str | None = None, device: str | torch.device = "cpu",
                batch_size: int = 64) -> Scorer:
    """CLIP score per image: 100 * max(cos(E_img, E_txt), 0) (Hessel et al. 2021, Eq. 1), [N] float32."""
    model = model or CLIP_MODEL
    pretrained = None if model.startswith(("local-dir:", "hf-hub:")) else (processor or CLIP_PRETRAINED)
    clip = _load_open_clip(model, pretrained, device, "model='local-dir:/path' (open_clip_config.json + weights) or "
                           "processor='/path/to/weights.bin'")
    return _batched(lambda images, prompts: 100 * _cosine(clip, images, prompts).clamp_min(0), batch_size)


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

    return _batched(score_batch, batch_size)


def resolve_weights_file(model: str | None, default_repo: str, default_file: str) -> str:
    """Local path of a weights file named by ``model``: an existing file; ``org/repo/path/in/repo`` on the hub; a bare
    file name in ``default_repo``; None = ``default_file`` in ``default_repo``. Hub files are fetched (and cached) with
    ``huggingface_hub.hf_hub_download``; a path that looks local (``/``, ``.``, ``~``, or ``dir/file``) and does not
    exist raises FileNotFoundError."""
    model = model or default_file
    if Path(model).expanduser().is_file():
        return str(Path(model).expanduser())
    parts = model.split("/")
    if len(parts) == 2 or model.startswith((".", "~", "/")):
        raise FileNotFoundError(f"no such file: {model}")
    repo, filename = (default_repo, model) if len(parts) == 1 else ("/".join(parts[:2]), "/".join(parts[2:]))
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """The state dict in the torch checkpoint ``path``: its ``"state_dict"`` entry, or the file itself when it is the
    state dict, with a leading ``module.`` (DistributedDataParallel wrapping) stripped from every key."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with a 'state_dict' entry, got "
                         f"{type(checkpoint).__name__}")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _weights(what: str, model: str | None, default_repo: str, default_file: str) -> dict[str, Tensor]:
    """``load_state_dict_file(resolve_weights_file(...))`` with the clear load error (model id, --scorer-model)."""
    try:
        return load_state_dict_file(resolve_weights_file(model, default_repo, default_file))
    except (OSError, ValueError) as error:
        raise _load_error(what, model or f"{default_repo}/{default_file}", f"model='/path/to/{default_file}' "
                          "(--scorer-model)", error) from error


HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2_compressed.pt"
HPSV2_ARCHITECTURE = "ViT-H-14"


def hpsv2_scorer(model: str | None = None, processor: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16) -> Scorer:
    """HPSv2 per image: 100 * cos(E_img, E_txt) of the open_clip architecture ``processor`` (default ViT-H-14)
    carrying the HPSv2 checkpoint ``model`` (Wu et al. 2023; see the module docstring), [N] float32."""
    state_dict = _weights("HPSv2 checkpoint", model, HPSV2_REPO, HPSV2_FILE)
    architecture = processor or HPSV2_ARCHITECTURE
    # The checkpoint replaces every weight, so the architecture is built without pretrained weights.
    clip = _load_open_clip(architecture, None, device, "processor='ViT-H-14' or 'local-dir:/path' (--scorer-processor)",
                           load_weights=False)
    try:
        clip.model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"the HPSv2 checkpoint {model or HPSV2_FILE!r} does not fit the open_clip architecture "
                         f"{architecture!r} (processor / --scorer-processor): {error}") from error
    return _batched(lambda images, prompts: 100 * _cosine(clip, images, prompts), batch_size)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor head: linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout
    (0.2, 0.2, 0.1; off in eval) and no activations, on L2-normalised CLIP image embeddings [N, width] -> [N].
    Module names match the released state dict (``layers.0`` ... ``layers.7``)."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP = "ViT-L-14"


def aesthetic_head(state_dict: dict[str, Tensor]) -> AestheticHead:
    """An eval-mode ``AestheticHead`` carrying ``state_dict`` (its input width read from ``layers.0.weight``)."""
    if "layers.0.weight" not in state_dict:
        raise ValueError(f"not an aesthetic predictor head: no 'layers.0.weight' among its keys "
                         f"{sorted(state_dict)[:8]}")
    head = AestheticHead(state_dict["layers.0.weight"].shape[1])
    head.load_state_dict(state_dict)
    return head.eval().requires_grad_(False)


def aesthetic_scorer(model: str | None = None, processor: str | None = None, device: str | torch.device = "cpu",
                     batch_size: int = 64) -> Scorer:
    """LAION aesthetic score per image: AestheticHead(normalised CLIP ViT-L/14 image embedding), [N] float32, roughly
    1..10; prompts are checked for count and otherwise ignored."""
    try:
        head = aesthetic_head(_weights("aesthetic predictor head", model, AESTHETIC_REPO, AESTHETIC_FILE))
    except RuntimeError as error:
        raise ValueError(f"the aesthetic head {model or AESTHETIC_FILE!r} does not have the layer layout of "
                         f"AestheticHead: {error}") from error
    clip_name = processor or AESTHETIC_CLIP
    pretrained = None if clip_name.startswith(("local-dir:", "hf-hub:")) else "openai"
    clip = _load_open_clip(clip_name, pretrained, device, "processor='local-dir:/path' (open_clip_config.json + "
                           "weights of CLIP ViT-L/14 OpenAI) (--scorer-processor)")
    width = getattr(clip.model.visual, "output_dim", None)
    if width is not None and width != head.layers[0].in_features:
        raise ValueError(f"the aesthetic head takes {head.layers[0].in_features}-d embeddings but the CLIP "
                         f"{clip_name!r} (processor / --scorer-processor) gives {width}-d ones")
    return _batched(lambda images, prompts: head(clip.image_embeddings(images)), batch_size)


SCORERS: dict[str, Callable[..., Scorer]] = {"clip": clip_scorer, "pickscore": pickscore_scorer,
                                              "hpsv2": hpsv2_scorer, "aesthetic": aesthetic_scorer}


def build_scorer(name: str, model: str | None = None, processor: str | None = None,
                 device: str | torch.device = "cpu") -> Scorer:
    """The scorer ``name`` of ``SCORERS`` with its weights (hub id / local path ``model``, and ``processor``:
    the open_clip pretrained tag for 'clip', the AutoProcessor id or path for 'pickscore', the open_clip architecture
    for 'hpsv2', the open_clip CLIP for 'aesthetic'; None = the defaults)."""
    if name not in SCORERS:
        raise ValueError(f"unknown reward scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name](model=model, processor=processor, device=device)


def win_rate(scores: Tensor, baseline_scores: Tensor) -> float:
    """Share of paired samples (same prompt, same noise) where ``scores`` beat ``baseline_scores``; ties count 1/2."""
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"win_rate needs paired scores of one shape, got {tuple(scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}")
    return ((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean().item()


# a saturated primary / secondary colour in [-1, 1] image units, e.g. red (1, -1, -1), has grey-removed norm sqrt(8/3)
SATURATED_CHROMA = (8.0 / 3.0) ** 0.5


def shape_area_reward(images: Tensor, prompts: list[str]) -> Tensor:
    """Known-rule reward of the built-in 'size' preference pairs (``fdistill.data.preference_rules``): the share of
    the image a coloured shape covers, measured as the mean over pixels of min(chroma / SATURATED_CHROMA, 1), where
    chroma is the norm of the pixel's colour with its grey component removed (grey background and its pixel noise
    score ~0, the shape's pixels 1). [N, 3, H, W] in [-1, 1] -> [N] in [0, 1]; the prompt is ignored (the rule
    prefers the larger shape for every caption)."""
    _check_pairs(images, prompts)
    chroma = (images - images.mean(dim=1, keepdim=True)).norm(dim=1)
    return (chroma / SATURATED_CHROMA).clamp(max=1.0).flatten(1).mean(dim=1)
