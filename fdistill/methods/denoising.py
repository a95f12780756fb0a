"""Method ``denoising``: train a denoiser (a teacher) with the weighted x0 regression of EDM (Karras et al. 2022,
Eq. 2 / Eq. 8) or the epsilon / v losses of VP models, with label dropout for classifier-free guidance.

Configured by ``DenoisingConfig`` (``conf/method/denoising.yaml``); built by ``build(config, model, data)`` where
``model`` is a denoiser module (e.g. ``fdistill.networks.digits_unet``: an EDMPrecond UNet) and ``data`` a DataSource.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoisers.guidance import ClassifierFreeGuidance
from ..losses.denoising import LOSS_WEIGHTS, lognormal_sigmas, noisy_sample, table_sigmas, weighted_denoising_loss
from ..samplers.config import SamplerConfig, as_sampler_config
from ..validation import require
from .base import Method, Phase, StepContext, check_optimizer_fields

SIGMA_DISTRIBUTIONS = ("lognormal", "table")


@dataclass
class DenoisingConfig:
    """Settings of the ``denoising`` method (``method.<field>=...``).

    Attributes:
        lr: learning rate (> 0).
        weight_decay: AdamW decoupled weight decay (>= 0).
        betas: Adam betas, two values in [0, 1).
        optimizer: one of 'adamw', 'adam', 'adafactor'.
        max_grad_norm: gradient-norm clipping threshold (> 0), or null for none.
        weighting: loss weight lambda(sigma): 'edm' (EDM Eq. 8, for EDMPrecond networks), 'epsilon' or 'v_prediction'
            (the plain losses of Diffusers VP models), 'x0' (unweighted).
        sigma_distribution: 'lognormal' (EDM: ln sigma ~ N(p_mean, p_std^2)) or 'table' (uniform over the model's
            discrete training sigmas ``model.train_sigmas``, i.e. VP timesteps t ~ U{0..T-1}).
        p_mean: mean of ln(sigma) for 'lognormal' (EDM: -1.2).
        p_std: standard deviation of ln(sigma) for 'lognormal' (> 0; EDM: 1.2).
        sigma_data: data standard deviation in the EDM weight (> 0; 0.5 for images in [-1, 1]).
        label_dropout: probability in [0, 1) of replacing a label by the null class ``num_classes`` (for CFG).
        sampler: the multi-step sampler of ``generate`` (sample grids, evaluation); null = the top-level ``sampler``
            group (filled in by ``fdistill.config``), or SamplerConfig's defaults when built from Python.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    optimizer: str = "adamw"
    max_grad_norm: float | None = 1.0
    weighting: str = "edm"
    sigma_distribution: str = "lognormal"
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    label_dropout: float = 0.0
    sampler: SamplerConfig | None = None

    def __post_init__(self):
        check_optimizer_fields(self)
        require(self.weighting in LOSS_WEIGHTS, f"method.weighting must be one of {sorted(LOSS_WEIGHTS)}, got {self.weighting!r}")
        require(self.sigma_distribution in SIGMA_DISTRIBUTIONS,
                f"method.sigma_distribution must be one of {SIGMA_DISTRIBUTIONS}, got {self.sigma_distribution!r}")
        require(self.p_std > 0, f"method.p_std must be > 0, got {self.p_std}")
        require(self.sigma_data > 0, f"method.sigma_data must be > 0, got {self.sigma_data}")
        require(0 <= self.label_dropout < 1, f"method.label_dropout must be in [0, 1), got {self.label_dropout}")
        self.sampler = as_sampler_config(self.sampler)


Config = DenoisingConfig


def drop_labels(labels: Tensor, probability: float, null_class: int) -> Tensor:
    """Replace each label by ``null_class`` with the given probability (classifier-free guidance training)."""
    if probability == 0:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device) < probability
    return labels.masked_fill(dropped, null_class)


class Denoising(Method):
    """Trains ``networks["denoiser"]`` (any module following the denoiser protocol) on data batches.

    Args:
        config: DenoisingConfig.
        denoiser: the network, D(x, sigma, labels) -> x0.
        sample_shape: shape of one sample ([C, H, W] or [D]).
        num_classes: classes of the labels (0 = unconditional; null class = num_classes).
    """

    def __init__(self, config: DenoisingConfig, denoiser: nn.Module, sample_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.config = config
        self.networks["denoiser"] = denoiser
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("model", ("denoiser",), lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas),
                      max_grad_norm=c.max_grad_norm, optimizer=c.optimizer)]

    def draw_sigmas(self, num: int, device: torch.device) -> Tensor:
        """Training noise levels [num] from the configured distribution."""
        if self.config.sigma_distribution == "table":
            table = getattr(self.networks["denoiser"], "train_sigmas", None)
            if table is None:
                raise ValueError("method.sigma_distribution='table' needs a model with a `train_sigmas` table "
                                 "(a Diffusers VP wrapper); use 'lognormal' for EDMPrecond networks")
            return table_sigmas(num, torch.as_tensor(table, device=device))
        return lognormal_sigmas(num, self.config.p_mean, self.config.p_std, device=device)

    def loss(self, phase: str, item: dict[str, Any], ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        x0 = item["x"]
        labels = item.get("label") if self.num_classes else None
        if labels is not None and ctx.training:
            labels = drop_labels(labels, self.config.label_dropout, self.num_classes)
        sigma = self.draw_sigmas(x0.shape[0], x0.device)
        noisy = noisy_sample(x0, sigma, torch.randn_like(x0))
        x0_hat = self.networks["denoiser"](noisy, sigma, labels)
        per_sample = weighted_denoising_loss(x0_hat, x0, sigma, self.config.weighting, self.config.sigma_data)
        loss = per_sample.mean()
        return loss, {"loss": loss.item()}

    def sampling_denoiser(self) -> nn.Module:
        """The denoiser used by ``generate``: with classifier-free guidance when sampler.guidance != 1."""
        denoiser = self.networks["denoiser"]
        if self.config.sampler.guidance == 1.0 or not self.num_classes:
            return denoiser
        return ClassifierFreeGuidance(denoiser, self.config.sampler.guidance,
                                      lambda cond: torch.full_like(cond, self.num_classes))

    @torch.no_grad()
    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` samples by the configured multi-step sampler; labels cycle 0, 1, ..., num_classes - 1 unless
        ``cond`` is given (so a grid shows every class in order)."""
        from .. import samplers

        device = next(self.networks["denoiser"].parameters()).device
        if cond is None and self.num_classes:
            cond = torch.arange(num, device=device) % self.num_classes
        s = self.config.sampler
        schedule = samplers.noise_levels(s, self.networks["denoiser"]).to(device)
        noise = torch.randn(num, *self.sample_shape, generator=generator, device="cpu").to(device) * schedule[0]
        return samplers.sample(self.sampling_denoiser(), noise, schedule, solver=s.solver, cond=cond).clamp(-1, 1)

    def export(self, directory: str | Path) -> None:
        """Write the denoiser as a model directory (``fdistill.denoisers.save_denoiser``: fdistill.json + unet/)."""
        from ..denoisers import save_denoiser

        save_denoiser(self.networks["denoiser"], directory)


def build(config: DenoisingConfig, model: nn.Module, data) -> Denoising:
    """The method from its config, the network of the ``model`` group and the DataSource of the ``data`` group."""
    return Denoising(config, model, data.sample_shape, data.num_classes)
