"""Periodic evaluation during training: the ``eval`` config group builds ``evaluate(generate_fn, step) -> dict``.

    # conf/eval/digits_fd.yaml
    _target_: fdistill.evaluation.periodic.make_evaluator
    features: digits
    reference: digits
    num: 1000

The trainer calls ``evaluate(trainer.generate, step)`` on the main process; every call draws the same seeded noise
(and the same balanced labels for class-conditional models), so successive values differ only by the model. A model
that generates NaN / inf gets a NaN metric (logged; the trainer's NaN handling decides), not a crash or a number
computed from clipped garbage.
"""
from __future__ import annotations

from typing import Callable

import torch

from .fid import SourceOptions, compute_metrics
from .sources import NonFiniteImagesError


class Evaluator:
    """``evaluate(generate_fn, step) -> {"fd_<features>": ..., ["kid", "precision", "recall", "class_tv"]}``.

    Args:
        features: "digits" | "inception" | "clip" (see ``fdistill.evaluation.extractors``).
        reference: statistics / images of the data (see ``fdistill.evaluation.fid``), e.g. "digits".
        num: samples per evaluation (>= 2; FD is biased upwards at small num, compare runs at equal num).
        batch_size, seed, device: sampling batch size, noise seed, feature-network device.
        num_classes: pass exactly balanced labels as ``cond`` (class-conditional models); None = unconditional.
        kid, pr: also KID / precision-recall. class_tv: with digits features, the total-variation distance between
            the predicted class histogram of the samples and the digits dataset's class frequencies.
    """

    def __init__(self, features: str = "digits", reference: str = "digits", num: int = 1000, batch_size: int = 250,
                 seed: int = 0, device: str = "cpu", num_classes: int | None = None, kid: bool = False,
                 pr: bool = False, class_tv: bool = True, mode: str = "clean", extractor_options: dict | None = None):
        if num < 2:
            raise ValueError(f"eval.num must be >= 2, got {num}")
        if class_tv and features != "digits":
            raise ValueError(f"eval.class_tv needs features=digits, got features={features!r}")
        self.features, self.reference, self.num, self.mode = features, reference, num, mode
        self.kid, self.pr, self.class_tv = kid, pr, class_tv
        self.options = SourceOptions(batch_size=batch_size, device=device, seed=seed, num_classes=num_classes)
        self.extractor_options = extractor_options or {}

    def __call__(self, generate_fn: Callable, step: int) -> dict[str, float]:
        samples = []
        if self.class_tv:
            generate_fn = _recording(generate_fn, samples)
        try:
            metrics = compute_metrics(generate_fn, self.reference, self.features, self.mode, self.num, None, self.kid,
                                      self.pr, self.options, self.extractor_options)
        except NonFiniteImagesError:
            return {f"fd_{self.features}": float("nan")}
        result = {f"fd_{self.features}": metrics["fid"]}
        result.update({key: metrics[key] for key in ("kid", "precision", "recall") if key in metrics})
        if self.class_tv:
            result["class_tv"] = digits_class_tv(torch.cat(samples))
        return result


def _recording(generate_fn: Callable, store: list) -> Callable:
    """``generate_fn`` that also appends each batch (CPU) to ``store``."""
    def generate(*args):
        images = generate_fn(*args)
        store.append(images.detach().cpu())
        return images
    return generate


def digits_class_tv(images: torch.Tensor) -> float:
    """TV distance between the predicted class histogram of ``images`` and the digits dataset's class frequencies."""
    from .digits import digits_class_histogram, digits_images

    labels = digits_images()[1]
    data_frequencies = torch.bincount(labels, minlength=10).double() / len(labels)
    return 0.5 * float((digits_class_histogram(images) - data_frequencies).abs().sum())


def make_evaluator(**options) -> Evaluator:
    """Factory for the ``eval`` config group (``_target_``); see ``Evaluator`` for the options."""
    return Evaluator(**options)
