"""f-distill: distil a diffusion teacher into a one-step generator by f-divergence distribution matching
(Xu, Nie & Vahdat 2025, arXiv 2502.15681). ``divergence="rkl"`` is DMD2 (Yin et al. 2024).

Networks:
- ``frozen.teacher``: any denoiser (Diffusers wrapper, fdistill EDM network, or an analytic one).
- ``networks.student``: a denoiser used as a one-step generator x = G(z) = D_student(sigma_g z, sigma_g);
  a copy of the teacher when the teacher is a network.
- ``networks.fake_score``: a denoiser trained on (detached) student samples; a copy of the teacher when it is a
  network, otherwise built from ``FDistillConfig.network``.
- ``networks.discriminator``: a head on ``features(x_t, sigma)`` of the teacher or the fake score (config choice);
  when that network has no ``features`` (analytic teachers) the head gets its own small feature net on (x, sigma).

Stable Diffusion teachers (text-to-image in VAE latent space, prompts as condition, one-step Diffusers pipeline
export) are the subclass in ``fdistill.methods.fdistill_text``; ``build`` picks it for SDComponents.

Phases: 'student' every ``student_update_freq``-th step, 'critic' (fake score + discriminator) otherwise.
Per-sample weights h(r) of the student phase are computed for all micro-batches in ``prepare_step`` (no grad),
with the same noise that ``loss`` reuses, and normalised with global-batch statistics (all processes, all
micro-batches): r / mean r of its noise-level bin (bins uniform in the sampled noise distribution, optional EMA in
persistent buffers), then h / mean h.
"""
from __future__ import annotations

import copy
import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..denoisers import ClassifierFreeGuidance, EmpiricalDenoiser
from ..denoisers.base import append_dims
from ..samplers.sampling import generator_inputs, generator_sample
from ..losses.denoising import edm_weight, epsilon_weight, time_uniform_sigmas, x0_weight
from ..losses.fdistill import (DIVERGENCES, binned_sums, check_divergence, density_ratio, discriminator_loss,
                               f_divergence_weight, fake_score_loss, fdistill_generator_loss, generator_gan_loss,
                               noise_level_bins)
from ..training.config import require
from .base import Method, Phase, StepContext


# ----------------------------------------------------------------------------------------- noise distributions

def _lognormal_sigma(u: Tensor, c: "FDistillConfig") -> Tensor:
    """log sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max] (EDM Sec. 5), by inverse CDF."""
    normal = torch.distributions.Normal(torch.tensor(c.p_mean, dtype=u.dtype), torch.tensor(c.p_std, dtype=u.dtype))
    lo, hi = (normal.cdf(torch.tensor(math.log(s), dtype=u.dtype)) for s in (c.sigma_min, c.sigma_max))
    return normal.icdf((lo + u * (hi - lo)).clamp(1e-7, 1 - 1e-7)).exp()


def _loguniform_sigma(u: Tensor, c: "FDistillConfig") -> Tensor:
    """log sigma uniform on [log sigma_min, log sigma_max]."""
    return torch.exp(math.log(c.sigma_min) + u * (math.log(c.sigma_max) - math.log(c.sigma_min)))


def _karras_sigma(u: Tensor, c: "FDistillConfig") -> Tensor:
    """sigma^(1/rho) uniform between sigma_min^(1/rho) and sigma_max^(1/rho): a uniform position on the EDM
    sampling schedule (Karras et al. 2022, Eq. 5), as DMD2 samples timesteps uniformly."""
    lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
    return (lo + u * (hi - lo)) ** c.rho


# u ~ U[0, 1) -> sigma, monotone increasing: u is the CDF value of sigma, so binning u is binning by quantile.
SIGMA_DISTRIBUTIONS: dict[str, Callable[[Tensor, "FDistillConfig"], Tensor]] = {
    "karras": _karras_sigma, "lognormal": _lognormal_sigma, "loguniform": _loguniform_sigma,
}


# The same draw, for VP teachers: t uniform in [t_min, t_max] of the teacher's discrete schedule (its table of
# training sigmas), as the official SD1.5 / SDXL recipes do (FastGen, DMD2). Its quantile is u as well.
TIME_UNIFORM = "time_uniform"
SIGMA_DISTRIBUTION_NAMES = (*SIGMA_DISTRIBUTIONS, TIME_UNIFORM)

# lambda(sigma) of the fake score's x0 denoising loss, lambda(sigma) * ||D - x0||^2 (``losses.denoising``):
# 'edm' (Karras et al. 2022, Eq. 8), 'x0' (unweighted x0 regression: FastGen's SD1.5 recipes) or 'epsilon'
# (sigma^-2, exactly the unweighted epsilon loss ||eps_hat - eps||^2: FastGen's SDXL recipes and DMD2).
FAKE_SCORE_WEIGHTINGS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "edm": edm_weight, "x0": x0_weight, "epsilon": epsilon_weight,
}
FEATURE_SOURCES = ("teacher", "fake_score")


@dataclass
class FDistillConfig:
    """Settings of f-distill (``method.<field>=...`` on the command line).

    Attributes:
        divergence: the f-divergence, one of rkl (= DMD2), kl, js, sf, sh, jf, neyman.
        lr: student learning rate (> 0), constant.
        critic_lr: learning rate of fake score + discriminator (> 0); null = lr.
        weight_decay: AdamW decoupled weight decay of both phases (>= 0).
        betas: Adam betas of both phases (each in [0, 1)).
        student_grad_clip: clip of the student's global gradient norm (> 0), or null.
        critic_grad_clip: clip of the critic's global gradient norm (> 0), or null.
        student_update_freq: the student is updated at every n-th step (n >= 2), the critic at the others.
        gan_weight: weight of the generator's GAN term softplus(-logit) in the student loss (>= 0).
        guidance_scale: classifier-free guidance of the teacher only (>= 1; 1 = off).
        generator_sigma: sigma_g, the noise level the one-step student is fed (> 0): x = D(sigma_g z, sigma_g);
            null = sigma_max.
        generator_sigmas: a few-step student instead: its chain's decreasing noise levels [sigma_1, ..., sigma_K]
            (x_1 = sigma_1 z, x_{k+1} = G(x_k, sigma_k) + sigma_{k+1} eps; DMD2 Sec. 4.5). Each training sample
            is the output of a uniformly drawn step whose earlier steps run without gradient (backward
            simulation). null = one step at generator_sigma.
        sigma_distribution: distribution of the noise levels of the distribution-matching, fake-score and
            discriminator terms: 'karras' (uniform on the EDM schedule), 'lognormal', 'loguniform', or
            'time_uniform' (VP teachers with discrete timesteps, e.g. Stable Diffusion: t uniform in [t_min, t_max],
            the noise level of timestep floor(T t); ``losses.denoising.time_uniform_sigmas``).
        sigma_min, sigma_max: the range of 'karras', 'lognormal', 'loguniform' (0 < sigma_min < sigma_max).
        t_min, t_max: the range of t of 'time_uniform' (0 <= t_min < t_max <= 1; FastGen: 0.001, 0.999).
        rho: exponent of the 'karras' distribution (> 0).
        p_mean, p_std: mean and std (> 0) of log sigma for 'lognormal'.
        sigma_data: data standard deviation (> 0), for the fake score's EDM loss weight and the feature net.
        fake_score_weighting: lambda(sigma) of the fake-score loss on x0: 'edm', 'x0' (unweighted x0 loss) or
            'epsilon' (sigma^-2: the unweighted epsilon loss of a VP / Diffusers model).
        num_ratio_bins: noise-level bins of the ratio normalisation (>= 0; 0 = no ratio normalisation).
        ratio_ema: EMA decay of the per-bin ratio means across steps, in [0, 1) (0 = this step's global batch).
        logit_clamp: |logit| clamp before r = exp(logit) (> 0).
        ratio_min, ratio_max: clamp of r (0 < ratio_min < ratio_max).
        normaliser_eps: epsilon of DMD2's per-sample gradient normaliser (> 0).
        features: what the discriminator reads: 'teacher' (frozen teacher features) or 'fake_score'.
        head_width: width of the discriminator head and of its own feature net (>= 1).
        network: for analytic teachers, how to build student and fake score: ``{"_target_": "module.function",
            **kwargs}`` (a callable returning a denoiser network). Ignored when the teacher is a network.
        prompts: text-to-image only: prompts of the sample grids (null = the data's prompts / captions).
        gradient_checkpointing: text-to-image only: recompute the student's and fake score's UNet activations in
            backward (less memory, slower).
    """

    divergence: str = "js"
    lr: float = 1e-4
    critic_lr: float | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    student_grad_clip: float | None = 10.0
    critic_grad_clip: float | None = 10.0
    student_update_freq: int = 5
    gan_weight: float = 1e-3
    guidance_scale: float = 1.0
    generator_sigma: float | None = None
    generator_sigmas: list[float] | None = None
    sigma_distribution: str = "karras"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    t_min: float = 0.001
    t_max: float = 0.999
    rho: float = 7.0
    p_mean: float = -0.4
    p_std: float = 1.0
    sigma_data: float = 0.5
    fake_score_weighting: str = "edm"
    num_ratio_bins: int = 10
    ratio_ema: float = 0.0
    logit_clamp: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    normaliser_eps: float = 1e-8
    features: str = "teacher"
    head_width: int = 64
    network: dict[str, Any] | None = field(default=None)
    prompts: list[str] | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        require(self.divergence in DIVERGENCES,
                 f"method.divergence must be one of {', '.join(DIVERGENCES)}; got {self.divergence!r}")
        for name in ("lr", "sigma_data", "rho", "p_std", "logit_clamp", "normaliser_eps"):
            require(getattr(self, name) > 0, f"method.{name} must be > 0, got {getattr(self, name)}")
        for name in ("critic_lr", "student_grad_clip", "critic_grad_clip", "generator_sigma"):
            value = getattr(self, name)
            require(value is None or value > 0, f"method.{name} must be > 0 or null, got {value}")
        require(self.weight_decay >= 0, f"method.weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(self.betas)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"method.betas must be two numbers in [0, 1), got {self.betas}")
        sigmas = self.generator_sigmas
        require(sigmas is None or (len(sigmas) >= 1 and all(s > 0 for s in sigmas)
                                   and all(a > b for a, b in zip(sigmas, sigmas[1:]))),
                f"method.generator_sigmas must be null or a strictly decreasing list of positive sigmas, got {sigmas}")
        require(sigmas is None or self.generator_sigma is None,
                "set either method.generator_sigmas (few-step) or method.generator_sigma (one step), not both")
        require(self.student_update_freq >= 2, f"method.student_update_freq must be >= 2, got {self.student_update_freq}")
        require(self.gan_weight >= 0, f"method.gan_weight must be >= 0, got {self.gan_weight}")
        require(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1, got {self.guidance_scale}")
        require(self.sigma_distribution in SIGMA_DISTRIBUTION_NAMES,
                 f"method.sigma_distribution must be one of {sorted(SIGMA_DISTRIBUTION_NAMES)}, got {self.sigma_distribution!r}")
        require(0 <= self.t_min < self.t_max <= 1,
                f"method.t_min / t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        require(0 < self.sigma_min < self.sigma_max,
                 f"method.sigma_min / sigma_max must satisfy 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(self.fake_score_weighting in FAKE_SCORE_WEIGHTINGS,
                 f"method.fake_score_weighting must be one of {sorted(FAKE_SCORE_WEIGHTINGS)}, got {self.fake_score_weighting!r}")
        require(self.num_ratio_bins >= 0, f"method.num_ratio_bins must be >= 0, got {self.num_ratio_bins}")
        require(0 <= self.ratio_ema < 1, f"method.ratio_ema must be in [0, 1), got {self.ratio_ema}")
        require(0 < self.ratio_min < self.ratio_max,
                 f"method.ratio_min / ratio_max must satisfy 0 < ratio_min < ratio_max, got {self.ratio_min}, {self.ratio_max}")
        require(self.features in FEATURE_SOURCES, f"method.features must be one of {FEATURE_SOURCES}, got {self.features!r}")
        require(self.head_width >= 1, f"method.head_width must be >= 1, got {self.head_width}")
        require(self.network is None or "_target_" in self.network,
                 f"method.network must be null or a mapping with a '_target_' callable path, got {self.network!r}")


Config = FDistillConfig


# ----------------------------------------------------------------------------------------- discriminator

class NoisyInputFeatures(nn.Module):
    """A small feature net on (x, sigma) for teachers without ``features`` (analytic ones).

    [B, *shape] x, [B] sigma -> [B, width]: an MLP on [x / sqrt(sigma^2 + sigma_data^2) flattened, log(sigma) / 4]
    (EDM's c_in and c_noise, so the input has unit variance at every noise level)."""

    def __init__(self, sample_numel: int, width: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.mlp = nn.Sequential(nn.Linear(sample_numel + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_in = append_dims(1.0 / torch.sqrt(sigma ** 2 + self.sigma_data ** 2), x.ndim)
        inputs = torch.cat([(c_in * x).flatten(1), sigma.log()[:, None] / 4], dim=1)
        return self.mlp(inputs.float())


class DiscriminatorHead(nn.Module):
    """Logit [B] from features: [B, C, h, w] (1x1 conv), [B, N, D] tokens or [B, F] vectors (linear), then SiLU,
    a mean over positions and an MLP. With ``num_classes`` > 0, a projection term <embed(label), pooled> (Miyato &
    Koyama 2018) makes the logit class-conditional, so r estimates p(x | c) / q(x | c)."""

    def __init__(self, feature_shape: tuple[int, ...], width: int = 64, num_classes: int = 0):
        super().__init__()
        channels = feature_shape[0]
        self.spatial = len(feature_shape) == 3
        self.lift = nn.Conv2d(channels, width, 1) if self.spatial else nn.Linear(feature_shape[-1], width)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes > 0 else None

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        lifted = self.lift(features.float())
        pooled = lifted.mean(dim=(2, 3)) if self.spatial else (lifted.mean(1) if lifted.ndim == 3 else lifted)
        hidden = self.mlp(pooled)
        logit = self.out(hidden)[:, 0]
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * hidden).sum(1)
        return logit


class Discriminator(nn.Module):
    """The trained part of the discriminator: a head and, for feature sources without ``features``, a backbone."""

    def __init__(self, head: DiscriminatorHead, backbone: NoisyInputFeatures | None = None):
        super().__init__()
        self.head = head
        self.backbone = backbone


# ----------------------------------------------------------------------------------------- the method

def _training_sigmas(teacher: nn.Module) -> Tensor:
    """[T] sigmas of the teacher's integer training timesteps (a Diffusers VP wrapper's ``train_sigmas``)."""
    table = getattr(teacher, "train_sigmas", None)
    require(table is not None, f"method.sigma_distribution={TIME_UNIFORM} needs a teacher with discrete VP timesteps "
            f"(a Diffusers model), got {type(teacher).__name__}; use karras, lognormal or loguniform")
    return torch.as_tensor(table, dtype=torch.float64)


def _is_network(module: nn.Module) -> bool:
    """A trainable network (its copies can be trained) rather than an analytic denoiser (buffers only)."""
    return any(True for _ in module.parameters())


def _class_labels(cond: Any) -> Tensor | None:
    return cond if isinstance(cond, Tensor) and cond.dtype == torch.long and cond.ndim == 1 else None


class FDistill(Method):
    """f-distill (see the module docstring). Built by ``build``; tests may construct it directly.

    Args:
        config: FDistillConfig.
        teacher: frozen denoiser.
        student: denoiser network used as the one-step generator (trained).
        fake_score: denoiser network (trained in the critic phase).
        sample_shape: shape of one sample ([C, H, W] or [D]).
        num_classes: classes of the ``"label"`` of the batches (0 = unconditional).
    """

    def __init__(self, config: FDistillConfig, teacher: nn.Module, student: nn.Module, fake_score: nn.Module,
                 sample_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.config = config
        self.sample_shape = tuple(sample_shape)
        self.num_classes = int(num_classes)
        self.set_generator_chain(config.generator_sigmas or [config.generator_sigma or config.sigma_max])
        self.frozen["teacher"] = teacher.requires_grad_(False).eval()
        if config.sigma_distribution == TIME_UNIFORM:
            self.register_buffer("teacher_sigmas", _training_sigmas(teacher), persistent=False)
        self.networks["student"] = student.requires_grad_(True)
        self.networks["fake_score"] = fake_score.requires_grad_(True)
        if self.uses_discriminator:
            self.networks["discriminator"] = self._build_discriminator()
        self.register_buffer("ratio_bin_means", torch.ones(config.num_ratio_bins))
        self.register_buffer("ratio_bins_seen", torch.zeros(config.num_ratio_bins, dtype=torch.bool))

    # -- construction
    def set_generator_chain(self, sigmas: list[float], vp_input: bool = False) -> None:
        """The student's noise levels (``generator_sigmas``; sigma_g = the first) and the scale c of its input
        noise: sigma_g (VE: x = c z has std sigma_g), or sqrt(1 + sigma_g^2) with ``vp_input`` (a VP network's
        input x / sqrt(1 + sigma^2) is then exactly z: the pure noise Diffusers pipelines start from)."""
        self.generator_sigmas = tuple(float(s) for s in sigmas)
        self.generator_sigma = self.generator_sigmas[0]
        self.generator_noise_scale = math.sqrt(1.0 + self.generator_sigma ** 2) if vp_input else self.generator_sigma

    def _feature_source(self) -> nn.Module:
        return self.frozen["teacher"] if self.config.features == "teacher" else self.networks["fake_score"]

    def _build_discriminator(self) -> Discriminator:
        source = self._feature_source()
        backbone = None
        if not callable(getattr(source, "features", None)):
            backbone = NoisyInputFeatures(math.prod(self.sample_shape), self.config.head_width, self.config.sigma_data)
        probe_x = torch.zeros(1, *self.sample_shape, device=self.device())
        probe_sigma = torch.ones(1, device=probe_x.device)
        with torch.no_grad():
            probe_cond = torch.zeros(1, dtype=torch.long, device=probe_x.device) if self.num_classes else None
            feats = backbone(probe_x, probe_sigma) if backbone is not None else source.features(probe_x, probe_sigma, probe_cond)
        head = DiscriminatorHead(tuple(feats.shape[1:]), self.config.head_width, self.num_classes)
        return Discriminator(head, backbone)

    def device(self) -> torch.device:
        """The device of the student's parameters (where training and generation run)."""
        tensor = next(self.networks["student"].parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    # -- contract
    def phases(self) -> list[Phase]:
        c = self.config
        common = dict(weight_decay=c.weight_decay, betas=c.betas, optimizer="adamw")
        return [Phase("student", ("student",), c.lr, max_grad_norm=c.student_grad_clip, **common),
                Phase("critic", ("fake_score", "discriminator") if self.uses_discriminator else ("fake_score",),
                      c.critic_lr or c.lr, max_grad_norm=c.critic_grad_clip, **common)]

    def phase_at(self, step: int) -> str:
        """'student' at steps n-1, 2n-1, ... (the critic warms up first), 'critic' otherwise."""
        return "student" if step % self.config.student_update_freq == self.config.student_update_freq - 1 else "critic"

    def ema_networks(self) -> tuple[str, ...]:
        return ("student",)

    @property
    def needs_ratio(self) -> bool:
        return self.config.divergence != "rkl"

    @property
    def uses_discriminator(self) -> bool:
        """A discriminator is built and trained when the divergence needs the density ratio or the student loss has
        a GAN term; rkl with gan_weight 0 is plain distribution matching (DMD) and needs no real samples."""
        return self.needs_ratio or self.config.gan_weight > 0

    def sample_sigma(self, u: Tensor) -> Tensor:
        """Noise levels [B] from quantiles u [B] in [0, 1) of the configured sigma distribution."""
        c = self.config
        if c.sigma_distribution == TIME_UNIFORM:
            return time_uniform_sigmas(u, self.teacher_sigmas, c.t_min, c.t_max).to(u.device)
        return SIGMA_DISTRIBUTIONS[c.sigma_distribution](u, c)

    def prepare_step(self, phase: str, micro_batches: list[dict[str, Any]], ctx: StepContext) -> list[dict[str, Any]]:
        """Draw each micro-batch's noise; in the student phase also compute the globally normalised weights h."""
        items = [self._draw(batch, ctx.device) for batch in micro_batches]
        if phase == "student" and self.needs_ratio:
            # one micro-batch: its sample and logit keep their graph for the loss (no second forward); several:
            # each is recomputed in its loss, so that only one micro-batch's activations live at a time
            keep = len(items) == 1
            with torch.enable_grad() if keep else torch.no_grad():
                logits = [self._student_logit(item, keep) for item in items]
            weights, stats = self.normalized_weights(logits, [item["u"] for item in items], ctx)
            for item, weight in zip(items, weights):
                item["weight"], item["stats"] = weight, stats
        return items

    def _draw(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The random draws of one micro-batch: generator input z, noise levels (quantiles u) and noise of the
        student's samples and, when the batch has real samples, of the real ones."""
        n = len(next(iter(batch.values())))
        u, u_real = torch.rand(n, device=device), torch.rand(n, device=device)
        z = torch.randn(n, *self.sample_shape, device=device)
        eps = torch.randn(n, *self.sample_shape, device=device)
        x_real = self.real_samples(batch, device)
        item = {"x_real": x_real, "cond": self.condition_of(batch, device), "z": z, "u": u,
                "sigma": self.sample_sigma(u), "eps": eps}
        if x_real is not None:
            item.update(sigma_real=self.sample_sigma(u_real), eps_real=torch.randn_like(x_real))
        if len(self.generator_sigmas) > 1:     # few-step student: the step each sample is generated at
            item.update(generator_step=torch.randint(len(self.generator_sigmas), (n,), device=device),
                        renoise=torch.randn(len(self.generator_sigmas) - 1, n, *self.sample_shape, device=device))
        return item

    def real_samples(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The discriminator's real samples [B, *sample_shape] of a batch (its ``"x"``), None when it has none."""
        return batch["x"].to(device) if "x" in batch else None

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> Any:
        """The condition of a batch: its class labels [B] when the data is labelled, else None."""
        label = batch.get("label") if self.num_classes else None
        return None if label is None else label.to(device)

    def _student_logit(self, item: dict[str, Any], keep: bool) -> Tensor:
        """Detached discriminator logits [B] of the student's noised samples; with ``keep`` the sample and the logit
        (graph into the student only) are stored in ``item`` for ``student_phase_loss``."""
        x = self.generated(item)
        with parameters_frozen(self.networks["discriminator"], self.networks["fake_score"]):
            logit = self.discriminator_logit(x + _times(item["sigma"], item["eps"]), item["sigma"], item["cond"])
        if keep:
            item["generated"], item["student_logit"] = x, logit
        return logit.detach()

    def normalized_weights(self, logits: list[Tensor], quantiles: list[Tensor], ctx: StepContext
                           ) -> tuple[list[Tensor], dict[str, float]]:
        """h(r) for every micro-batch of this process, normalised with global-batch statistics.

        Args:
            logits: discriminator logits, one [b_i] tensor per micro-batch.
            quantiles: CDF values u [b_i] of each sample's sigma under the sampling distribution.
            ctx: all_reduce_sum reaches every process (two collectives, same order on every process).
        Returns: per-micro-batch weights (global mean exactly 1), and scalars to log.
        """
        ratios = [density_ratio(l, self.config.logit_clamp, self.config.ratio_min, self.config.ratio_max) for l in logits]
        if self.config.num_ratio_bins:
            ratios = self._normalise_by_bins(ratios, quantiles, ctx)
        weights = [f_divergence_weight(r, self.config.divergence) for r in ratios]
        totals = torch.stack([sum(w.double().sum() for w in weights), torch.tensor(float(sum(w.numel() for w in weights)),
                                                                                   dtype=torch.float64, device=weights[0].device)])
        total, count = ctx.all_reduce_sum(totals).unbind()
        mean_weight = total / count
        stats = {"ratio_mean": float(torch.cat(ratios).mean()), "weight_mean_raw": float(mean_weight)}
        return [(w.double() / mean_weight).float() for w in weights], stats

    def _normalise_by_bins(self, ratios: list[Tensor], quantiles: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """r / (global mean r of its noise-level bin); the bins are uniform in the sampled sigma distribution."""
        n = self.config.num_ratio_bins
        bins = [noise_level_bins(q, n) for q in quantiles]
        sums, counts = (torch.stack(parts).sum(0) for parts in zip(*(binned_sums(r, b, n) for r, b in zip(ratios, bins))))
        # global sums and counts, divided once: a bin seen by fewer processes than there are gets its exact mean
        reduced = ctx.all_reduce_sum(torch.stack([sums, counts]))
        bin_means = self._update_bin_means(reduced[0], reduced[1], ctx.training)
        return [(r.double() / bin_means[b]).float() for r, b in zip(ratios, bins)]

    def _update_bin_means(self, sums: Tensor, counts: Tensor, training: bool) -> Tensor:
        """Per-bin means of this step (bins without samples keep the stored value), blended with the stored ones by
        ``ratio_ema``; stored (persistent buffers) only while training."""
        seen = counts > 0
        stored = self.ratio_bin_means.to(sums.device, torch.float64)
        current = torch.where(seen, sums / counts.clamp_min(1), stored)     # counts are whole numbers: >= 1 if seen
        if self.config.ratio_ema > 0:
            blend = self.ratio_bins_seen.to(sums.device) & seen
            current = torch.where(blend, self.config.ratio_ema * stored + (1 - self.config.ratio_ema) * current, current)
        if training:
            self.ratio_bin_means.copy_(current)
            self.ratio_bins_seen |= seen.to(self.ratio_bins_seen.device)
        return current

    def loss(self, phase: str, item: dict[str, Any], ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        return PHASE_LOSSES[phase](self, item)

    # -- networks as functions
    def student_sample(self, z: Tensor, cond: Any = None, renoise: Tensor | None = None) -> Tensor:
        """Generation: one step x = D_student(c z, sigma_g, cond) (c = ``generator_noise_scale``), or the whole
        few-step chain. z [B, *shape] standard normal; renoise [K - 1, B, *shape] (few-step; None: drawn here)."""
        if renoise is None and len(self.generator_sigmas) > 1:
            renoise = torch.randn(len(self.generator_sigmas) - 1, *z.shape, device=z.device)
        return generator_sample(self.networks["student"], z, self.generator_sigmas, self.generator_noise_scale,
                                renoise, cond)

    def generated(self, item: dict[str, Any]) -> Tensor:
        """The student's training sample of a prepared micro-batch (with gradient into the student): the one-step
        output, or the output of each sample's drawn step of the few-step chain (earlier steps without gradient)."""
        with torch.no_grad():
            x_in, sigma_in = generator_inputs(self.networks["student"], item["z"], self.generator_sigmas,
                                              self.generator_noise_scale, item.get("generator_step"),
                                              item.get("renoise"), item["cond"])
        return self.networks["student"](x_in, sigma_in, item["cond"])

    def generator_noise(self, num: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """z [num, *shape] and, for a few-step student, renoise [K - 1, num, *shape], drawn from ``generator``
        (on its device) and moved to the student's device."""
        device = self.device()
        noise_device = generator.device if generator is not None else device
        noise = torch.randn(len(self.generator_sigmas), num, *self.sample_shape, generator=generator,
                            device=noise_device).to(device)
        return noise[0], noise[1:] if len(self.generator_sigmas) > 1 else None

    def guided_teacher(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """Teacher x0 with classifier-free guidance x0 + (w - 1)(x0 - x0_uncond); the null condition is the
        teacher's ``uncond(cond)`` when it has one, else None (unconditional call of an analytic teacher)."""
        teacher = self.frozen["teacher"]
        if self.config.guidance_scale == 1.0 or cond is None:
            return teacher(x, sigma, cond)
        return ClassifierFreeGuidance(teacher, self.config.guidance_scale, getattr(teacher, "uncond", None))(x, sigma, cond)

    def discriminator_logit(self, x_t: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """Logit [B] of 'x_t is real' for noisy x_t at noise level sigma [B] (with grad into x_t and the head)."""
        disc = self.networks["discriminator"]
        if disc.backbone is not None:
            feats = disc.backbone(x_t, sigma)
        else:
            feats = self._feature_source().features(x_t, sigma, cond)
        return disc.head(feats, _class_labels(cond))

    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` samples of the student; class labels cycle 0..num_classes-1 when the data is labelled and cond is
        None."""
        z, renoise = self.generator_noise(num, generator)
        if cond is None and self.num_classes:
            cond = torch.arange(num, device=z.device) % self.num_classes
        with torch.no_grad():
            x = self.student_sample(z, cond, renoise).float()
        return x.clamp(-1, 1) if x.ndim == 4 else x

    def export(self, directory: str) -> None:
        """Save the student as a one- or few-step generator (``fdistill sample`` and Diffusers load it)."""
        from ..denoisers.io import save_denoiser

        save_denoiser(self.networks["student"], directory, kind="generator", generator_sigmas=self.generator_sigmas,
                      generator_noise_scale=self.generator_noise_scale)


def _times(sigma: Tensor, eps: Tensor) -> Tensor:
    return append_dims(sigma, eps.ndim) * eps


@contextmanager
def parameters_frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on the trainable parameters of ``modules`` (gradients still reach inputs)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def student_phase_loss(method: FDistill, item: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """Weighted distribution matching (+ gan_weight * generator GAN term) at the prepared noise."""
    config, sigma, cond = method.config, item["sigma"], item["cond"]
    x = item["generated"] if "generated" in item else method.generated(item)
    x_t = x + _times(sigma, item["eps"])
    with torch.no_grad():
        x0_teacher = method.guided_teacher(x_t.detach(), sigma, cond)
        x0_fake = method.networks["fake_score"](x_t.detach(), sigma, cond)
    weight = item.get("weight")
    weight = torch.ones(x.shape[0], device=x.device) if weight is None else weight
    matching = fdistill_generator_loss(x, x0_fake, x0_teacher, weight, config.normaliser_eps).mean()
    logs = {"student/matching": float(matching.detach()), "student/weight_max": float(weight.max())}
    logs.update({f"student/{k}": v for k, v in item.get("stats", {}).items()})
    if config.gan_weight == 0:
        return matching, logs
    # the critic's parameters must not collect gradients here: the trainer steps (and clears) only the student's
    logit = item.get("student_logit")
    if logit is None:
        with parameters_frozen(method.networks["discriminator"], method.networks["fake_score"]):
            logit = method.discriminator_logit(x_t, sigma, cond)
    gan = generator_gan_loss(logit).mean()
    logs["student/gan"] = float(gan.detach())
    return matching + config.gan_weight * gan, logs


def critic_phase_loss(method: FDistill, item: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """Fake-score denoising loss on detached student samples + discriminator loss (real data positive; only when
    the method uses a discriminator)."""
    config, sigma, cond = method.config, item["sigma"], item["cond"]
    with torch.no_grad():
        x = method.generated(item).float()
    x_t = x + _times(sigma, item["eps"])
    lam = FAKE_SCORE_WEIGHTINGS[config.fake_score_weighting](sigma, config.sigma_data)
    denoising = fake_score_loss(method.networks["fake_score"](x_t, sigma, cond), x, lam).mean()
    if not method.uses_discriminator:
        return denoising, {"critic/fake_score": float(denoising.detach())}
    real_t = item["x_real"] + _times(item["sigma_real"], item["eps_real"])
    real_logit = method.discriminator_logit(real_t, item["sigma_real"], cond)
    fake_logit = method.discriminator_logit(x_t, sigma, cond)
    disc = discriminator_loss(real_logit, fake_logit).mean()
    logs = {name: float(value.detach()) for name, value in (("critic/fake_score", denoising), ("critic/discriminator", disc),
            ("critic/real_logit", real_logit.mean()), ("critic/fake_logit", fake_logit.mean()))}
    return denoising + disc, logs


PHASE_LOSSES: dict[str, Callable[[FDistill, dict[str, Any]], tuple[Tensor, dict[str, float]]]] = {
    "student": student_phase_loss, "critic": critic_phase_loss,
}


# ----------------------------------------------------------------------------------------- build

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


def build(config: FDistillConfig, model: Any, data: Any) -> FDistill:
    """The f-distill method for a teacher ``model`` (a denoiser; None = the data's exact denoiser; Stable Diffusion
    components: text-to-image, ``fdistill.methods.fdistill_text``) and ``data``."""
    if not isinstance(config, FDistillConfig):
        config = FDistillConfig(**dict(config))
    check_divergence(config.divergence)
    if isinstance(model, tuple):          # fdistill.denoisers.load_denoiser returns (denoiser, info)
        model = model[0]
    from ..pipelines import SDComponents

    if isinstance(model, SDComponents):   # Stable Diffusion: text-to-image in latent space
        from .fdistill_text import build_text_to_image

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
    return FDistill(config, teacher, student, fake_score, tuple(data.sample_shape), num_classes)
