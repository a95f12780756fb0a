"""The exact density ratio of f-distill on a Gaussian-mixture teacher (tests and diagnostics only).

f-distill weights each student sample by h(r) with r = p_sigma(x_t) / q_sigma(x_t), the ratio of the noised
teacher and student marginals at the sample's noise level (Xu, Nie & Vahdat 2025, Theorem 1), which the method
estimates with a discriminator. On a mixture both densities are known: the teacher's noised marginal is the noised
mixture sum_k w_k N(mu_k, s_k^2 + sigma^2) (``GaussianMixtureDenoiser.log_density``), and the student's is its
sample distribution convolved with N(0, sigma^2 I), i.e. the average of Gaussians of std sigma centred on its
samples (a kernel density estimate whose bandwidth is the noise level itself: exact for the empirical student).
``OracleRatioFDistill`` uses that ratio in place of the discriminator's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..methods.fdistill import FDistill
from ..methods.fdistill.method import PreparedBatch


def noised_sample_log_density(x_t: Tensor, sigma: Tensor, samples: Tensor, chunk: int = 2048) -> Tensor:
    """log q_sigma(x_t) = log mean_n N(x_t; x_n, sigma^2 I) of the empirical distribution of ``samples`` noised at
    sigma: x_t [B, D], sigma [B] (> 0), samples [N, D] -> [B] float64 (chunks of ``chunk`` samples bound memory)."""
    x_t, samples = x_t.double().flatten(1), samples.double().flatten(1)
    var = sigma.double()[:, None] ** 2                                                     # [B, 1]
    log_norm = -0.5 * x_t.shape[1] * torch.log(2 * math.pi * var)                          # [B, 1]
    parts = [torch.logsumexp(log_norm - 0.5 * torch.cdist(x_t, block) ** 2 / var, dim=1)
             for block in samples.split(chunk)]
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(samples))


def oracle_log_ratio(teacher, x_t: Tensor, sigma: Tensor, student_samples: Tensor) -> Tensor:
    """log r = log p_sigma(x_t) - log q_sigma(x_t), [B] float64: ``teacher`` a GaussianMixtureDenoiser, x_t [B, D],
    sigma [B], student_samples [N, D] clean samples of the student (independent of x_t, so that no point of the
    estimate sits on its own kernel)."""
    return teacher.log_density(x_t.double(), sigma.double()) - noised_sample_log_density(x_t, sigma, student_samples)


class OracleRatioFDistill(FDistill):
    """f-distill whose student weights h(r) use the oracle log r instead of the discriminator's logit (the same
    clamps, bins and normalisation follow); the discriminator still trains and still gives the GAN term.

    ``num_reference`` fresh student samples per student step make the kernel density estimate."""

    num_reference: int = 4096

    def _student_logit(self, item: PreparedBatch, keep: bool) -> Tensor:
        super()._student_logit(item, keep)               # keeps the sample and discriminator logit for the GAN term
        with torch.no_grad():
            x = item.generated.detach() if item.generated is not None else self.generated(item)
            reference = self.generate(self.num_reference)
            x_t = x + item.sigma.view(-1, *[1] * (x.ndim - 1)) * item.eps
            return oracle_log_ratio(self.frozen["teacher"], x_t, item.sigma, reference).float()


class ExactStudentDenoiser(torch.nn.Module):
    """The exact denoiser of the student's current distribution, E[x0 | x_t] under the empirical distribution of
    ``num_reference`` fresh student samples (``EmpiricalDenoiser``), in place of the learned fake score
    (diagnostics only). It keeps the learned network as a submodule, so the critic phase still has parameters to
    step; the student phase reads the exact posterior mean."""

    def __init__(self, network: torch.nn.Module, sample_student, num_reference: int = 4096):
        super().__init__()
        self.network = network
        self.sample_student = sample_student
        self.num_reference = num_reference

    def forward(self, x_t: Tensor, sigma: Tensor, cond=None) -> Tensor:
        from ..denoisers import EmpiricalDenoiser
        with torch.no_grad():
            return EmpiricalDenoiser(self.sample_student(self.num_reference))(x_t, sigma).to(x_t.dtype)
