"""The data-dependent parts of f-distill in data space: samples are the data's own tensors, optionally with class
labels; and ``build``, which picks the domain (Stable Diffusion components: ``text.TextToImageDomain``)."""
from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
from torch import Tensor, nn

from ...denoisers import EmpiricalDenoiser
from .config import FDistillConfig
from .method import FDistill


class PixelDomain:
    """Samples [B, *sample_shape] in data space (images [C, H, W] in [-1, 1], or vectors [D]); the condition is the
    batch's ``"label"`` [B] when ``num_classes`` > 0. The student is a VE generator (its input is sigma_g z).

    Args:
        sample_shape: shape of one sample.
        num_classes: classes of the batches' labels (0 = unconditional).
    """

    vp_input = False
    prompts = None

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0):
        self.sample_shape = tuple(sample_shape)
        self.num_classes = int(num_classes)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}

    def default_generator_sigma(self, config: FDistillConfig, teacher: nn.Module) -> float:
        """sigma_g when the config sets none: the top of the sampled noise range."""
        return config.sigma_max

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The class labels [B] of a batch when the data is labelled, else None."""
        label = batch.get("label") if self.num_classes else None
        return None if label is None else label.to(device)

    def real_samples(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The discriminator's real samples [B, *sample_shape] of a batch (its ``"x"``), None when it has none."""
        return batch["x"].to(device) if "x" in batch else None

    def generation_condition(self, num: int, cond: Any, device: torch.device) -> Any:
        """``cond`` if given, else classes 0 .. num_classes - 1 in turn when the data is labelled, else None."""
        if cond is None and self.num_classes:
            return torch.arange(num, device=device) % self.num_classes
        return cond

    def decode(self, x: Tensor) -> Tensor:
        """Student output -> samples in float32; images are clamped to [-1, 1]."""
        x = x.float()
        return x.clamp(-1, 1) if x.ndim == 4 else x

    def export(self, student: nn.Module, directory: str, generator_sigmas: tuple[float, ...],
               noise_scale: float) -> None:
        """The student as a generator model directory (``fdistill.denoisers.save_denoiser``)."""
        from ...denoisers.io import save_denoiser

        save_denoiser(student, directory, kind="generator", generator_sigmas=generator_sigmas,
                      generator_noise_scale=noise_scale)


def instantiate_network(spec: dict[str, Any]) -> nn.Module:
    """Call ``spec["_target_"]`` ("package.module.callable") with the other keys as keyword arguments."""
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    module_name, _, attribute = str(spec["_target_"]).rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"method.network._target_ {spec['_target_']!r} cannot be imported: {error}") from error
    return target(**kwargs)


def teacher_from(model: Any, data: Any) -> nn.Module:
    """The teacher: ``model`` if given, else the exact denoiser the data source ships (``extras["denoiser"]``, e.g.
    a Gaussian mixture), else the ideal denoiser of the in-memory training set (EmpiricalDenoiser of ``"x"``, with
    ``"label"`` as classes when the data is labelled)."""
    if model is not None:
        return model
    extras = getattr(data, "extras", None) or {}
    if "denoiser" in extras:
        return extras["denoiser"]
    tensors = getattr(getattr(data, "dataset", None), "tensors", None)
    if not tensors or "x" not in tensors:
        raise ValueError("fdistill needs a teacher: set the model group, or use an in-memory data source (its exact "
                         "EmpiricalDenoiser is the teacher) or one with data.extras['denoiser']")
    labels = tensors.get("label") if getattr(data, "num_classes", 0) else None
    return EmpiricalDenoiser(tensors["x"], labels)


def _is_network(module: nn.Module) -> bool:
    """A trainable network (its copies can be trained) rather than an analytic denoiser (buffers only)."""
    return any(True for _ in module.parameters())


def build(config: FDistillConfig, model: Any, data: Any) -> FDistill:
    """The f-distill method for a teacher ``model`` (a denoiser; None = the data's exact denoiser; Stable Diffusion
    components: text-to-image, ``text.build_text_to_image``) and ``data``."""
    if not isinstance(config, FDistillConfig):
        config = FDistillConfig(**dict(config))
    if isinstance(model, tuple):          # fdistill.denoisers.load_denoiser returns (denoiser, info)
        model = model[0]
    from ...pipelines import SDComponents

    if isinstance(model, SDComponents):   # Stable Diffusion: text-to-image in latent space
        from .text import build_text_to_image

        return build_text_to_image(config, model, data)
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"fdistill needs a teacher denoiser (nn.Module) or Stable Diffusion components "
                         f"(fdistill.pipelines.SDComponents, model=sd15|sdxl|tiny_sd), got {type(model).__name__}")
    teacher = teacher_from(model, data)
    if _is_network(teacher):
        student, fake_score = copy.deepcopy(teacher), copy.deepcopy(teacher)
    elif config.network is not None:
        student = instantiate_network(config.network)
        fake_score = copy.deepcopy(student)
    else:
        raise ValueError("the teacher is analytic (no parameters): set method.network = {_target_: ..., ...} "
                         "to build the student and the fake score")
    num_classes = getattr(data, "num_classes", 0)
    if _is_network(teacher) and not getattr(teacher, "num_classes", None):
        num_classes = 0      # an unconditional teacher network: labels of the data are not used
    return FDistill(config, teacher, student, fake_score, PixelDomain(tuple(data.sample_shape), num_classes))
