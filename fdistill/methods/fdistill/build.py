"""``build``: the f-distill method for a teacher and a data source (``fdistill.config`` calls it with the
method's ``Config``). Stable Diffusion components get ``text.build_text_to_image``; any other teacher a
``PixelDomain``."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ...denoisers import EmpiricalDenoiser
from ...networks import instantiate_network
from .config import FDistillConfig
from .domain import PixelDomain
from .method import FDistill


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
    from ...flow_pipelines import FluxComponents, SD3Components
    from ...pipelines import SDComponents

    if isinstance(model, (SDComponents, SD3Components, FluxComponents)):   # text-to-image in latent space
        from .text import build_text_to_image

        return build_text_to_image(config, model, data)
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"fdistill needs a teacher denoiser (nn.Module) or latent text-to-image components "
                         f"(fdistill.pipelines.SDComponents, model=sd15|sdxl|tiny_sd; fdistill.flow_pipelines."
                         f"SD3Components / FluxComponents, model=sd3|flux|tiny_sd3|tiny_flux), got {type(model).__name__}")
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
