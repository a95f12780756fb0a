"""``PreparedBatch``: what ``FDistill.prepare_step`` draws for one micro-batch and its ``loss`` reuses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class PreparedBatch:
    """One micro-batch's draws, made in ``prepare_step`` and reused by ``loss`` (B samples of ``sample_shape``).

    Attributes:
        cond: the batch's condition (class labels [B], UNet keyword arguments of its prompts, or None).
        z: [B, *shape] standard normal input of the generator.
        u: [B] quantiles in [0, 1) of the noise levels ``sigma`` (they pick the ratio bins).
        sigma: [B] noise levels of the student's samples in the matching / fake-score / discriminator terms.
        eps: [B, *shape] standard normal noise of the student's samples: x_t = x + sigma eps.
        x_real: [B, *shape] real samples of the discriminator, None when the batch has none.
        sigma_real, eps_real: [B] and [B, *shape]: the real samples' noise levels and noise (None without them).
        generator_step: [B] long, the few-step chain's step each sample is generated at (None: one-step student).
        renoise: [K - 1, B, *shape] standard normal re-noising of the few-step chain (None: one-step student).
        weight: [B] h(r) normalised to global mean 1 (student phase, divergences but rkl), else None; stats: its logs.
        generated, student_logit: [B, *shape] the student's samples and [B] their logits, with their graph, kept
            from the weighting when the step has one micro-batch (else None: ``loss`` recomputes them).
    """

    cond: Any
    z: Tensor
    u: Tensor
    sigma: Tensor
    eps: Tensor
    x_real: Tensor | None = None
    sigma_real: Tensor | None = None
    eps_real: Tensor | None = None
    generator_step: Tensor | None = None
    renoise: Tensor | None = None
    weight: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    generated: Tensor | None = None
    student_logit: Tensor | None = None


# how the student's input noise z ~ N(0, I) is scaled at sigma_g (``FDistill.set_generator_chain``)
