"""The teachers of scripts/bench_samplers.py (exact or learned denoisers, each with its exact answer for a batch of
starting noises at SIGMA_MAX) and the benchmark's sigma range; the module docstring of bench_samplers.py describes
them."""
from __future__ import annotations

import math
from typing import Callable

import torch

from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.samplers import sample, sigmas

SIGMA_MIN, SIGMA_MAX = 0.029167, 14.614641      # Stable Diffusion's scaled-linear VP schedule, in sigma units
DIM, BATCH, DIGITS_BATCH = 16, 128, 256         # analytic teachers' dimension and batch; the digits teacher's batch


def denoise(teacher, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return teacher(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def gaussian_teacher(seed: int = 0) -> tuple[GaussianMixtureDenoiser, Callable]:
    """One Gaussian (means ~ N(0, I), stds log-spaced in [0.05, 2]) and its exact answer for a noise batch."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, DIM, generator=generator, dtype=torch.float64)
    std = torch.logspace(math.log10(0.05), math.log10(2.0), DIM, dtype=torch.float64)[None]
    teacher = GaussianMixtureDenoiser(mean, std)

    def exact(noise: torch.Tensor) -> tuple[torch.Tensor, float]:
        shrink = torch.sqrt(std ** 2 + SIGMA_MIN ** 2) / torch.sqrt(std ** 2 + SIGMA_MAX ** 2)
        return denoise(teacher, mean + (noise - mean) * shrink, SIGMA_MIN), 0.0
    return teacher, exact


def mixture_teacher(std_range: tuple[float, float], seed: int = 0) -> tuple[GaussianMixtureDenoiser, Callable]:
    """8 components, means ~ N(0, I), isotropic stds ~ U[std_range], and its fine-solve answer (see module doc)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(8, DIM, generator=generator, dtype=torch.float64)
    low, high = std_range
    stds = low + (high - low) * torch.rand(8, generator=generator, dtype=torch.float64)
    return fine_solve_reference(GaussianMixtureDenoiser(means, stds))


class LearnedDigitsTeacher(torch.nn.Module):
    """The shipped class-conditional digits teacher (fdistill/assets/digits_teacher, a tiny EDM UNet) as a flat 64-D
    denoiser of the benchmark: sample k of a batch has class k mod 10 (class-balanced), and the network runs in
    float32 (7x faster than float64 on the CPU) while the solvers integrate in float64."""

    def __init__(self):
        super().__init__()
        from fdistill.networks import digits_teacher
        self.network = digits_teacher()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        labels = torch.arange(x.shape[0]) % 10
        images = self.network(x.float().view(-1, 1, 8, 8), sigma.float(), labels)
        return images.reshape(x.shape).to(x.dtype)


def digits_teacher() -> tuple[LearnedDigitsTeacher, Callable]:
    """The learned digits teacher and its fine-solve answer."""
    return fine_solve_reference(LearnedDigitsTeacher())


def fine_solve_reference(teacher) -> tuple[object, Callable]:
    """``teacher`` and its answer from a 500-step singlestep DPM-Solver-3 solve (error bound: distance to 250)."""
    def solve(noise: torch.Tensor, steps: int) -> torch.Tensor:
        return sample(teacher, noise, sigmas("logsnr", steps, SIGMA_MIN, SIGMA_MAX, append_zero=False), "dpm_solver_3")

    def exact(noise: torch.Tensor) -> tuple[torch.Tensor, float]:
        fine, half = solve(noise, 500), solve(noise, 250)
        return denoise(teacher, fine, SIGMA_MIN), (fine - half).norm(dim=1).max().item()
    return teacher, exact


# name -> (builder, dimension, batch)
TEACHERS = {"gaussian": (gaussian_teacher, DIM, BATCH), "mixture_mild": (lambda: mixture_teacher((0.3, 0.6)), DIM, BATCH),
            "mixture_stiff": (lambda: mixture_teacher((0.02, 0.1)), DIM, BATCH), "digits": (digits_teacher, 64, DIGITS_BATCH)}
