"""Settings of f-distill (``method.<field>=...`` on the command line): the one source of its defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...denoisers.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN
from ...losses.denoising import LOSS_WEIGHTS
from ...losses.fdistill import DIVERGENCES
from ...validation import require

# Noise-level distributions of the distribution-matching, fake-score and discriminator terms (quantile samplers of
# ``losses.denoising``); 'time_uniform' is for VP teachers with discrete timesteps.
TIME_UNIFORM = "time_uniform"
SIGMA_DISTRIBUTIONS = ("karras", "lognormal", "loguniform", TIME_UNIFORM)
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
            discriminator terms (quantile samplers of ``losses.denoising``): 'karras' (uniform on the EDM schedule),
            'lognormal' (truncated to [sigma_min, sigma_max]), 'loguniform', or 'time_uniform' (VP teachers with
            discrete timesteps, e.g. Stable Diffusion: t uniform in [t_min, t_max], the noise level of timestep
            floor(T t)).
        sigma_min, sigma_max: the range of 'karras', 'lognormal', 'loguniform' (0 < sigma_min < sigma_max).
        t_min, t_max: the range of t of 'time_uniform' (0 <= t_min < t_max <= 1; FastGen: 0.001, 0.999).
        rho: exponent of the 'karras' distribution (> 0).
        p_mean, p_std: mean and std (> 0) of log sigma for 'lognormal'.
        sigma_data: data standard deviation (> 0), for the fake score's EDM loss weight and the feature net.
        fake_score_weighting: lambda(sigma) of the fake-score loss on x0, a key of ``losses.denoising.LOSS_WEIGHTS``:
            'edm', 'x0' (unweighted x0 loss: FastGen's SD1.5 recipes), 'epsilon' (sigma^-2: the unweighted epsilon
            loss of a VP / Diffusers model: FastGen's SDXL recipes, DMD2) or 'v_prediction'.
        regression_weight: weight of DMD's regression loss in the student loss (>= 0; 0 = off; Yin et al. 2024 Sec. 3.3,
            lambda_reg 0.25 there): squared error between the one-step student's output from z and the teacher's
            ODE sample from the same z (``regression``). It keeps the modes the ODE map reaches when the student has
            no teacher weights to start from (an analytic teacher).
        regression_warmup_steps: first steps that train the student on the regression loss alone (>= 0), so that
            distribution matching starts from the teacher's ODE map instead of a network that outputs one point.
        critic_warmup_steps: steps after the regression warm-up that train only the fake score and discriminator
            (>= 0), so the student's first matching gradients come from a critic fitted to it (DMD2 and f-distill
            start the fake score from the teacher's weights, which an analytic teacher does not have).
        regression_pairs: (noise, teacher ODE sample) pairs of the regression loss, drawn once from a fixed seed (>= 1).
        regression_solver_steps: DPM-Solver++(2M) steps of the teacher's ODE from sigma_g for those pairs (>= 1).
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
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    t_min: float = 0.001
    t_max: float = 0.999
    rho: float = 7.0
    p_mean: float = -0.4
    p_std: float = 1.0
    sigma_data: float = 0.5
    fake_score_weighting: str = "edm"
    regression_weight: float = 0.0
    regression_warmup_steps: int = 0
    critic_warmup_steps: int = 0
    regression_pairs: int = 4096
    regression_solver_steps: int = 20
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
        require(self.sigma_distribution in SIGMA_DISTRIBUTIONS,
                 f"method.sigma_distribution must be one of {sorted(SIGMA_DISTRIBUTIONS)}, got {self.sigma_distribution!r}")
        require(0 <= self.t_min < self.t_max <= 1,
                f"method.t_min / t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        require(0 < self.sigma_min < self.sigma_max,
                 f"method.sigma_min / sigma_max must satisfy 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(self.fake_score_weighting in LOSS_WEIGHTS,
                 f"method.fake_score_weighting must be one of {sorted(LOSS_WEIGHTS)}, got {self.fake_score_weighting!r}")
        for name in ("regression_weight", "regression_warmup_steps", "critic_warmup_steps"):
            require(getattr(self, name) >= 0, f"method.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("regression_pairs", "regression_solver_steps"):
            require(getattr(self, name) >= 1, f"method.{name} must be >= 1, got {getattr(self, name)}")
        require((self.regression_weight == 0 and self.regression_warmup_steps == 0) or sigmas is None or len(sigmas) == 1,
                "method.regression_weight / regression_warmup_steps need a one-step student (method.generator_sigmas "
                f"null or one sigma), got generator_sigmas={sigmas}")
        require(self.num_ratio_bins >= 0, f"method.num_ratio_bins must be >= 0, got {self.num_ratio_bins}")
        require(0 <= self.ratio_ema < 1, f"method.ratio_ema must be in [0, 1), got {self.ratio_ema}")
        require(0 < self.ratio_min < self.ratio_max,
                 f"method.ratio_min / ratio_max must satisfy 0 < ratio_min < ratio_max, got {self.ratio_min}, {self.ratio_max}")
        require(self.features in FEATURE_SOURCES, f"method.features must be one of {FEATURE_SOURCES}, got {self.features!r}")
        require(self.head_width >= 1, f"method.head_width must be >= 1, got {self.head_width}")
        require(self.network is None or "_target_" in self.network,
                 f"method.network must be null or a mapping with a '_target_' callable path, got {self.network!r}")
