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

Modules: ``config`` (FDistillConfig), ``heads`` (discriminator), ``ratio`` (global per-noise-level ratio
normalisation), ``method`` (FDistill: phases, draws, losses), ``domain`` (what FDistill asks of the data; data
space), ``text`` (Stable Diffusion teachers: latent space, prompts, Diffusers pipeline export), ``build`` (picks the
domain).
"""
from .config import FDistillConfig
from .build import build, teacher_from
from .domain import Domain, PixelDomain
from .heads import Discriminator, DiscriminatorHead, NoisyInputFeatures
from .method import FDistill
from .prepared import PreparedBatch
from .ratio import RatioNormaliser

Config = FDistillConfig

__all__ = ["Config", "Discriminator", "DiscriminatorHead", "Domain", "FDistill", "FDistillConfig",
           "NoisyInputFeatures", "PixelDomain", "PreparedBatch", "RatioNormaliser", "build",
           "teacher_from"]
