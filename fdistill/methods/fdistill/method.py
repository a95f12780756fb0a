"""The f-distill objective: phases, the per-step draws (``prepare_step``) and the two phases' losses.

Phases: 'student' every ``student_update_freq``-th step, 'critic' (fake score + discriminator) otherwise, after
optional warm-ups: 'regression' (DMD's regression loss alone, ``regression``) and then 'critic' alone.
Per-sample weights h(r) of the student phase are computed for all micro-batches in ``prepare_step`` (no grad),
with the same noise that ``loss`` reuses, and normalised with global-batch statistics (``ratio.RatioNormaliser``,
then h / mean h). What depends on the data (pixels with class labels, or Stable Diffusion latents with prompts) is
the method's ``domain`` (``domain.PixelDomain``, ``text.TextToImageDomain``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ...denoisers import ClassifierFreeGuidance
from ...denoisers.base import append_dims
from ...losses.denoising import (karras_uniform_sigmas, loguniform_sigmas, time_uniform_sigmas,
                                 truncated_lognormal_sigmas, weighted_denoising_loss)
from ...losses.fdistill import (density_ratio, discriminator_loss, f_divergence_weight, fdistill_generator_loss,
                                generator_gan_loss)
from ...samplers.sampling import generator_inputs, generator_sample
from ...validation import require
from ..base import Method, Phase, StepContext
from .config import TIME_UNIFORM, FDistillConfig
from .domain import Domain
from .heads import build_discriminator, class_labels
from .prepared import PreparedBatch
from .ratio import RatioNormaliser, mean_one_weights
from .regression import regression_pairs, regression_phase_loss, regression_term


GENERATOR_INPUT_SCALES = {"ve": lambda sigma: sigma, "vp": lambda sigma: math.sqrt(1.0 + sigma ** 2),
                          "flow": lambda sigma: 1.0 + sigma}


def _training_sigmas(teacher: nn.Module) -> Tensor:
    """[T] sigmas of the teacher's integer training timesteps (a Diffusers VP wrapper's ``train_sigmas``)."""
    table = getattr(teacher, "train_sigmas", None)
    require(table is not None, f"method.sigma_distribution={TIME_UNIFORM} needs a teacher with discrete VP timesteps "
            f"(a Diffusers model), got {type(teacher).__name__}; use karras, lognormal or loguniform")
    return torch.as_tensor(table, dtype=torch.float64)


class FDistill(Method):
    """f-distill (see the package docstring). Built by ``build``; tests may construct it directly.

    Args:
        config: FDistillConfig.
        teacher: frozen denoiser.
        student: denoiser network used as the one- or few-step generator (trained).
        fake_score: denoiser network (trained in the critic phase).
        domain: the data-dependent parts (``domain.Domain``: ``PixelDomain`` or ``text.TextToImageDomain``); its
            ``frozen_modules`` become frozen members.
    """

    def __init__(self, config: FDistillConfig, teacher: nn.Module, student: nn.Module, fake_score: nn.Module,
                 domain: Domain):
        super().__init__()
        self.config = config
        self.domain = domain
        self.sample_shape = tuple(domain.sample_shape)
        self.num_classes = int(domain.num_classes)
        sigmas = config.generator_sigmas or [config.generator_sigma or domain.default_generator_sigma(config, teacher)]
        self.set_generator_chain(sigmas, input_scaling=domain.input_scaling)
        self.frozen["teacher"] = teacher.requires_grad_(False).eval()
        if config.sigma_distribution == TIME_UNIFORM:
            self.register_buffer("teacher_sigmas", _training_sigmas(teacher), persistent=False)
        self.networks["student"] = student.requires_grad_(True)
        self.networks["fake_score"] = fake_score.requires_grad_(True)
        if self.uses_discriminator:
            self.networks["discriminator"] = build_discriminator(
                self._feature_source(), self.sample_shape, config.head_width, config.sigma_data, self.num_classes,
                self.device())
        self.ratio = RatioNormaliser(config.num_ratio_bins, config.ratio_ema)
        self._regression_pairs: tuple[Tensor, Tensor, Any] | None = None     # built on first use (regression_pairs)
        for name, module in domain.frozen_modules().items():
            self.frozen[name] = module.requires_grad_(False).eval()

    @property
    def prompts(self) -> list[str] | None:      # sample grids of a text-to-image domain
        return self.domain.prompts

    def set_generator_chain(self, sigmas: list[float], input_scaling: str = "ve") -> None:
        """The student's noise levels (``generator_sigmas``; sigma_g = the first) and the scale c of its input
        noise (``GENERATOR_INPUT_SCALES[input_scaling]``): sigma_g ("ve": x = c z has std sigma_g), sqrt(1 +
        sigma_g^2) ("vp": a VP network's input x / sqrt(1 + sigma^2) is then exactly z, the pure noise Diffusers
        pipelines start from) or 1 + sigma_g ("flow": a rectified-flow network's x_t = x / (1 + sigma) is z)."""
        self.generator_sigmas = tuple(float(s) for s in sigmas)
        self.generator_sigma = self.generator_sigmas[0]
        self.generator_noise_scale = GENERATOR_INPUT_SCALES[input_scaling](self.generator_sigma)

    def _feature_source(self) -> nn.Module:
        return self.frozen["teacher"] if self.config.features == "teacher" else self.networks["fake_score"]

    def device(self) -> torch.device:
        """The device of the student's parameters (where training and generation run)."""
        tensor = next(self.networks["student"].parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    # -- contract
    def phases(self) -> list[Phase]:
        c = self.config
        common = dict(weight_decay=c.weight_decay, betas=c.betas, optimizer="adamw")
        phases = [Phase("student", ("student",), c.lr, max_grad_norm=c.student_grad_clip, **common),
                  Phase("critic", ("fake_score", "discriminator") if self.uses_discriminator else ("fake_score",),
                        c.critic_lr or c.lr, max_grad_norm=c.critic_grad_clip, **common)]
        if c.regression_warmup_steps:
            phases.append(Phase("regression", ("student",), c.lr, max_grad_norm=c.student_grad_clip,
                                last_step=c.regression_warmup_steps - 1, **common))
        return phases

    def phase_at(self, step: int) -> str:
        """'regression' in the first regression_warmup_steps steps, then 'critic' for critic_warmup_steps steps;
        after them 'student' at every student_update_freq-th step (n-1, 2n-1, ...: the critic goes first),
        'critic' otherwise."""
        c = self.config
        if step < c.regression_warmup_steps:
            return "regression"
        step -= c.regression_warmup_steps + c.critic_warmup_steps
        return "student" if step >= 0 and step % c.student_update_freq == c.student_update_freq - 1 else "critic"

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
        if c.sigma_distribution == "lognormal":
            return truncated_lognormal_sigmas(u, c.p_mean, c.p_std, c.sigma_min, c.sigma_max)
        if c.sigma_distribution == "loguniform":
            return loguniform_sigmas(u, c.sigma_min, c.sigma_max)
        return karras_uniform_sigmas(u, c.sigma_min, c.sigma_max, c.rho)

    def prepare_step(self, phase: str, micro_batches: list[dict[str, Any]], ctx: StepContext) -> list[PreparedBatch]:
        """Draw each micro-batch's noise; in the student phase also compute the globally normalised weights h."""
        items = [self._draw(batch, ctx.device) for batch in micro_batches]
        if phase == "student" and self.needs_ratio:
            # one micro-batch: its sample and logit keep their graph for the loss (no second forward); several:
            # each is recomputed in its loss, so that only one micro-batch's activations live at a time
            keep = len(items) == 1
            with torch.enable_grad() if keep else torch.no_grad():
                logits = [self._student_logit(item, keep) for item in items]
            weights, stats = self.normalized_weights(logits, [item.u for item in items], ctx)
            for item, weight in zip(items, weights):
                item.weight, item.stats = weight, stats
        return items

    def _draw(self, batch: dict[str, Any], device: torch.device) -> PreparedBatch:
        """The random draws of one micro-batch: generator input z, noise levels (quantiles u) and noise of the
        student's samples and, when the batch has real samples, of the real ones."""
        n = len(next(iter(batch.values())))
        u, u_real = torch.rand(n, device=device), torch.rand(n, device=device)
        z = torch.randn(n, *self.sample_shape, device=device)
        eps = torch.randn(n, *self.sample_shape, device=device)
        x_real = self.domain.real_samples(batch, device)
        item = PreparedBatch(cond=self.domain.condition_of(batch, device), z=z, u=u, sigma=self.sample_sigma(u),
                             eps=eps, x_real=x_real)
        if x_real is not None:
            item.sigma_real, item.eps_real = self.sample_sigma(u_real), torch.randn_like(x_real)
        if len(self.generator_sigmas) > 1:     # few-step student: the step each sample is generated at
            item.generator_step = torch.randint(len(self.generator_sigmas), (n,), device=device)
            item.renoise = torch.randn(len(self.generator_sigmas) - 1, n, *self.sample_shape, device=device)
        return item

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> Any:
        """The condition of a batch (the domain's: class labels, prompt conditioning or None)."""
        return self.domain.condition_of(batch, device)

    def _student_logit(self, item: PreparedBatch, keep: bool) -> Tensor:
        """Detached discriminator logits [B] of the student's noised samples; with ``keep`` the sample and the logit
        (graph into the student only) are stored in ``item`` for ``student_phase_loss``."""
        x = self.generated(item)
        with parameters_frozen(self.networks["discriminator"], self.networks["fake_score"]):
            logit = self.discriminator_logit(x + _times(item.sigma, item.eps), item.sigma, item.cond)
        if keep:
            item.generated, item.student_logit = x, logit
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
        c = self.config
        ratios = [density_ratio(l, c.logit_clamp, c.ratio_min, c.ratio_max) for l in logits]
        ratios = self.ratio(ratios, quantiles, ctx.all_reduce_sum, update=ctx.training)
        weights, mean_weight = mean_one_weights([f_divergence_weight(r, c.divergence) for r in ratios],
                                                ctx.all_reduce_sum)
        return weights, {"ratio_mean": float(torch.cat(ratios).mean()), "weight_mean_raw": float(mean_weight)}

    def loss(self, phase: str, item: PreparedBatch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        return PHASE_LOSSES[phase](self, item)

    # -- networks as functions
    def student_sample(self, z: Tensor, cond: Any = None, renoise: Tensor | None = None) -> Tensor:
        """Generation: one step x = D_student(c z, sigma_g, cond) (c = ``generator_noise_scale``), or the whole
        few-step chain. z [B, *shape] standard normal; renoise [K - 1, B, *shape] (few-step; None: drawn here)."""
        if renoise is None and len(self.generator_sigmas) > 1:
            renoise = torch.randn(len(self.generator_sigmas) - 1, *z.shape, device=z.device)
        return generator_sample(self.networks["student"], z, self.generator_sigmas, self.generator_noise_scale,
                                renoise, cond)

    def generated(self, item: PreparedBatch) -> Tensor:
        """The student's training sample of a prepared micro-batch (with gradient into the student): the one-step
        output, or the output of each sample's drawn step of the few-step chain (earlier steps without gradient)."""
        with torch.no_grad():
            x_in, sigma_in = generator_inputs(self.networks["student"], item.z, self.generator_sigmas,
                                              self.generator_noise_scale, item.generator_step, item.renoise, item.cond)
        return self.networks["student"](x_in, sigma_in, item.cond)

    def regression_pairs(self) -> tuple[Tensor, Tensor, Any]:
        """DMD's regression data (z, the guided teacher's ODE samples y, their condition), built on first use
        (``regression.regression_pairs``)."""
        if self._regression_pairs is None:
            self._regression_pairs = regression_pairs(self)
        return self._regression_pairs

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
        own = disc.backbone is not None
        feats = disc.backbone(x_t, sigma) if own else self._feature_source().features(x_t, sigma, cond)
        return disc.head(feats, class_labels(cond))

    @torch.no_grad()
    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` samples of the student in data space (the domain's decoding; images in [-1, 1]) for the
        condition ``cond``, by default the domain's (classes or prompts in turn, or none)."""
        z, renoise = self.generator_noise(num, generator)
        condition = self.domain.generation_condition(num, cond, z.device)
        return self.domain.decode(self.student_sample(z, condition, renoise))

    def export(self, directory: str) -> None:
        """Save the student as a one- or few-step generator (``fdistill sample`` and Diffusers load it)."""
        self.domain.export(self.networks["student"], directory, self.generator_sigmas, self.generator_noise_scale)


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


def student_phase_loss(method: FDistill, item: PreparedBatch) -> tuple[Tensor, dict[str, float]]:
    """Weighted distribution matching (+ gan_weight * generator GAN term) at the prepared noise."""
    config, sigma, cond = method.config, item.sigma, item.cond
    x = item.generated if item.generated is not None else method.generated(item)
    x_t = x + _times(sigma, item.eps)
    with torch.no_grad():
        x0_teacher = method.guided_teacher(x_t.detach(), sigma, cond)
        x0_fake = method.networks["fake_score"](x_t.detach(), sigma, cond)
    weight = torch.ones(x.shape[0], device=x.device) if item.weight is None else item.weight
    matching = fdistill_generator_loss(x, x0_fake, x0_teacher, weight, config.normaliser_eps).mean()
    logs = {"student/matching": float(matching.detach()), "student/weight_max": float(weight.max())}
    logs.update({f"student/{k}": v for k, v in item.stats.items()})
    loss = matching
    if config.regression_weight > 0:
        regression = regression_term(method, x.shape[0])
        logs["student/regression"] = float(regression.detach())
        loss = loss + config.regression_weight * regression
    if config.gan_weight == 0:
        return loss, logs
    # the critic's parameters must not collect gradients here: the trainer steps (and clears) only the student's
    logit = item.student_logit
    if logit is None:
        with parameters_frozen(method.networks["discriminator"], method.networks["fake_score"]):
            logit = method.discriminator_logit(x_t, sigma, cond)
    gan = generator_gan_loss(logit).mean()
    logs["student/gan"] = float(gan.detach())
    return loss + config.gan_weight * gan, logs


def critic_phase_loss(method: FDistill, item: PreparedBatch) -> tuple[Tensor, dict[str, float]]:
    """Fake-score denoising loss (``losses.denoising``, weighting ``fake_score_weighting``) on detached student
    samples + discriminator loss (real data positive; only when the method uses a discriminator)."""
    config, sigma, cond = method.config, item.sigma, item.cond
    with torch.no_grad():
        x = method.generated(item).float()
    x_t = x + _times(sigma, item.eps)
    x0_fake = method.networks["fake_score"](x_t, sigma, cond)
    denoising = weighted_denoising_loss(x0_fake, x, sigma, config.fake_score_weighting, config.sigma_data).mean()
    if not method.uses_discriminator:
        return denoising, {"critic/fake_score": float(denoising.detach())}
    real_t = item.x_real + _times(item.sigma_real, item.eps_real)
    real_logit = method.discriminator_logit(real_t, item.sigma_real, cond)
    fake_logit = method.discriminator_logit(x_t, sigma, cond)
    disc = discriminator_loss(real_logit, fake_logit).mean()
    logs = {name: float(value.detach()) for name, value in (("critic/fake_score", denoising), ("critic/discriminator", disc),
            ("critic/real_logit", real_logit.mean()), ("critic/fake_logit", fake_logit.mean()))}
    return denoising + disc, logs


PHASE_LOSSES: dict[str, Callable[[FDistill, PreparedBatch], tuple[Tensor, dict[str, float]]]] = {
    "student": student_phase_loss, "critic": critic_phase_loss, "regression": regression_phase_loss,
}
