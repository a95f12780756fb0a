"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, Sec. 3.2): storage (``ModelStatistics``,
safetensors) and estimation from a denoiser (``compute_ems``); the solver is ``dpm_solver_v3.py``.

EMS (paper Sec. 3.2 / Eq. 10), estimated on samples x_lambda = x0 + sigma eps of the model's own distribution:

    l(lambda) = argmin E ||grad_x f||_F^2 over diagonal l = E[diag(grad_x (sigma eps))] = 1 - E[diag(grad_x D)],
    s, b      = per-element least squares of f' = df/dlambda (along the ODE) on f: s = Cov(f', f) / Var(f),
                b = E[f'] - s E[f].

The diagonal of grad_x D is estimated with Hutchinson's probe (E[v * J v], v Rademacher) and J v and f' by central
finite differences of the denoiser, so any denoiser works (no autograd through it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .v3_variants import V3_VARIANTS

EMS_FORMAT = "fdistill-ems-v1"
CALIBRATION_KEY = "dpm_solver_v3_calibration"   # safetensors metadata: JSON [{"sigmas": [...], "variant": name}]
SIGMA_MATCH_RTOL = 1e-6          # ModelStatistics.calibrated_variant: sigma lists equal to this relative tolerance
X_STEP_FLOOR = 0.1               # compute_ems: the x-step of the Jacobian probe is fd_step * max(sigma, this)


def interpolate(knots: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """Piecewise-linear interpolation along dim 0, constant beyond the ends. knots [K] increasing, values [K, ...],
    query [M]; returns [M, ...]."""
    query = query.clamp(knots[0], knots[-1])
    upper = torch.searchsorted(knots, query).clamp(1, len(knots) - 1)
    lower = upper - 1
    weight = ((query - knots[lower]) / (knots[upper] - knots[lower])).view(-1, *[1] * (values.ndim - 1))
    return values[lower] + weight * (values[upper] - values[lower])


def cumulative_trapezoid(grid: Tensor, values: Tensor) -> Tensor:
    """Running integral of values [M, ...] over grid [M] from grid[0]; [M, ...], first entry 0."""
    widths = (grid[1:] - grid[:-1]).view(-1, *[1] * (values.ndim - 1))
    steps = 0.5 * widths * (values[1:] + values[:-1])
    return torch.cat([torch.zeros_like(values[:1]), steps.cumsum(0)])


@dataclass
class ModelStatistics:
    """Empirical model statistics on a lambda grid: lambdas [K] strictly increasing (lambda = -log sigma), l, s, b
    [K, *sample_shape] (or [K] for one value shared by all elements). Values in between are interpolated linearly;
    beyond the grid the end values hold.

    ``calibration`` maps a sigma list (a tuple of floats, decreasing) to the name of the ``dpm_solver_v3`` variant
    (``v3_variants.V3_VARIANTS``) that was most accurate on it for this model (``calibrate_dpm_solver_v3``);
    ``dpm_solver_v3`` applies it when it samples on that list."""

    lambdas: Tensor
    l: Tensor
    s: Tensor
    b: Tensor
    calibration: dict[tuple[float, ...], str] = field(default_factory=dict)

    def __post_init__(self):
        self.lambdas = torch.as_tensor(self.lambdas, dtype=torch.float64)
        if self.lambdas.ndim != 1 or len(self.lambdas) < 2 or not bool((self.lambdas.diff() > 0).all()):
            raise ValueError("ModelStatistics: lambdas must be a 1-D strictly increasing tensor with >= 2 entries")
        for name in ("l", "s", "b"):
            value = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if value.ndim < 1 or value.shape[0] != len(self.lambdas):
                raise ValueError(f"ModelStatistics: {name} must be [K, ...] with K = {len(self.lambdas)} "
                                 f"(the lambda grid), got {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"ModelStatistics: {name} has non-finite values")
            setattr(self, name, value)
        if not (self.l.shape == self.s.shape == self.b.shape):
            raise ValueError(f"ModelStatistics: l, s, b shapes differ: {tuple(self.l.shape)}, {tuple(self.s.shape)}, "
                             f"{tuple(self.b.shape)}")
        for sigmas, variant in self.calibration.items():
            if variant not in V3_VARIANTS:
                raise ValueError(f"ModelStatistics: calibration variant {variant!r} for {len(sigmas) - 1} steps is "
                                 f"not a dpm_solver_v3 variant; allowed: {', '.join(V3_VARIANTS)}")

    def calibrated_variant(self, sigmas: list[float]) -> str | None:
        """The variant calibrated for this sigma list (entries equal to relative ``SIGMA_MATCH_RTOL``), else None."""
        for calibrated, variant in self.calibration.items():
            if len(calibrated) == len(sigmas) and all(math.isclose(a, b, rel_tol=SIGMA_MATCH_RTOL, abs_tol=0.0)
                                                      for a, b in zip(calibrated, sigmas)):
                return variant
        return None

    def check_sample_shape(self, sample_shape: tuple[int, ...]) -> None:
        """ValueError unless the statistics are shared by all elements ([K]) or per element of ``sample_shape``."""
        element_shape = tuple(self.l.shape[1:])
        if element_shape and element_shape != tuple(sample_shape):
            raise ValueError(f"statistics per element of shape {element_shape} do not match the model's samples "
                             f"{tuple(sample_shape)}; compute them for this model (scripts/compute_ems.py)")

    @classmethod
    def constant(cls, l: float = 1.0, s: float = 0.0, b: float = 0.0, lambda_range: tuple[float, float] = (-12, 12)
                 ) -> "ModelStatistics":
        """Statistics constant in lambda. The default l = 1, s = b = 0 makes ``dpm_solver_v3`` multistep
        DPM-Solver++ (data prediction); l = 0, s = -1 makes it multistep DPM-Solver (noise prediction)."""
        lambdas = torch.tensor(lambda_range, dtype=torch.float64)
        return cls(lambdas, torch.full((2,), float(l)), torch.full((2,), float(s)), torch.full((2,), float(b)))

    def save(self, path: str | Path) -> None:
        """Write a safetensors file with tensors lambdas, l, s, b (and the calibration in its metadata)."""
        from safetensors.torch import save_file
        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        calibration = [{"sigmas": list(sigmas), "variant": variant} for sigmas, variant in self.calibration.items()]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": EMS_FORMAT, CALIBRATION_KEY: json.dumps(calibration)})

    @classmethod
    def load(cls, path: str | Path) -> "ModelStatistics":
        """Read a file written by ``save``."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"EMS file {path} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != EMS_FORMAT:
                raise ValueError(f"{path}: not an EMS file (metadata format != {EMS_FORMAT!r})")
            missing = {"lambdas", "l", "s", "b"} - set(handle.keys())
            if missing:
                raise ValueError(f"{path}: missing tensors {sorted(missing)}")
            try:
                calibration = {tuple(float(sigma) for sigma in entry["sigmas"]): str(entry["variant"])
                               for entry in json.loads(metadata.get(CALIBRATION_KEY, "[]"))}
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path}: unreadable {CALIBRATION_KEY} metadata ({error})") from error
            return cls(*(handle.get_tensor(name) for name in ("lambdas", "l", "s", "b")), calibration=calibration)

def _call(denoiser: Callable, x: Tensor, sigma: float, cond: Any) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), cond).to(x.dtype)


def _batch_cond(cond: Any, num_samples: int, batch: slice) -> Any:
    """Per-sample conditioning (a tensor with num_samples rows) is sliced with the batch; anything else is shared."""
    return cond[batch] if torch.is_tensor(cond) and cond.ndim >= 1 and cond.shape[0] == num_samples else cond


@torch.no_grad()
def compute_ems(denoiser: Callable, sample_shape: tuple[int, ...], num_samples: int, lambdas: Tensor,
                cond: Any = None, *, data: Tensor | None = None, sampling_steps: int = 50, batch_size: int = 256,
                fd_step: float | None = None, ridge: float | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu", progress: bool = False) -> ModelStatistics:
    """Empirical model statistics l, s, b of ``denoiser`` on the lambda grid (paper Sec. 3.2; module docstring).

    Args:
        denoiser: ``D(x, sigma [B], cond) -> x0`` (VE sigma units).
        sample_shape: shape of one sample, e.g. (3, 32, 32).
        num_samples: samples per lambda (the paper uses a few hundred to a few thousand).
        lambdas: [K] strictly increasing lambda = -log sigma grid; it should cover the sigmas you sample with.
        cond: passed to the denoiser (a tensor with ``num_samples`` rows is split with the batches).
        data: [num_samples, *sample_shape] samples of the model's data distribution; None = draw them from the model
            with ``sampling_steps`` steps of dpmpp_3m from sigma = exp(-lambdas[0]) (Karras sigmas) to 0.
        fd_step: relative step of the finite differences (in x: fd_step * max(sigma, X_STEP_FLOOR); in lambda:
            fd_step); None = 1e-3 in float64, 1e-2 in lower precision. The floor keeps the x-step above the
            denoiser's rounding at small sigma: in float32, fd_step * sigma there turned l into noise and made the
            sampler diverge (64-D mixture, 8 Karras steps: error 3e3 against 0.15).
        ridge: s = Cov(f', f) / (Var(f) + ridge * E[f^2]); None = 1e-8 in float64, 1e-3 in lower precision. Where f
            barely varies (large sigma, where D is nearly the data mean; a Gaussian's f is deterministic), rounding
            noise would otherwise make s arbitrary (float32, 64-D mixture: |s| up to 70 and a diverging sampler).
        seed: seeds the noise, the Hutchinson probes and the generated data.
        progress: a progress bar over the lambda grid (two passes: l, then s and b).
    Returns: ModelStatistics with l, s, b of shape [K, *sample_shape] (float64, on the CPU).
    """
    from .plumbing import integrate
    from .schedules import sigmas as make_sigmas
    from .solvers import dpmpp_3m
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    low_precision = dtype != torch.float64
    fd_step = (1e-2 if low_precision else 1e-3) if fd_step is None else fd_step
    ridge = (1e-3 if low_precision else 1e-8) if ridge is None else ridge
    if lambdas.ndim != 1 or len(lambdas) < 3 or not bool((lambdas.diff() > 0).all()):
        raise ValueError("compute_ems: lambdas must be a 1-D strictly increasing grid with >= 3 entries")
    generator = torch.Generator().manual_seed(seed)
    shape = (num_samples, *sample_shape)
    if data is None:
        sigma_max, sigma_min = math.exp(-lambdas[0].item()), math.exp(-lambdas[-1].item())
        start = sigma_max * torch.randn(shape, generator=generator, dtype=dtype).to(device)
        schedule = make_sigmas("karras", sampling_steps, sigma_min, sigma_max)
        data = torch.cat([integrate(dpmpp_3m, denoiser, start[k:k + batch_size], schedule,
                                 _batch_cond(cond, num_samples, slice(k, k + batch_size)))
                          for k in range(0, num_samples, batch_size)])
    if tuple(data.shape) != shape:
        raise ValueError(f"compute_ems: data must be {shape}, got {tuple(data.shape)}")
    data = data.to(device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    probes = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)
    batches = [slice(k, k + batch_size) for k in range(0, num_samples, batch_size)]

    def jacobian_diagonal(lam: float) -> Tensor:
        sigma, total = math.exp(-lam), torch.zeros(sample_shape, dtype=dtype, device=device)
        step = fd_step * max(sigma, X_STEP_FLOOR)
        for batch in batches:
            x, v, c = data[batch] + sigma * noise[batch], probes[batch], _batch_cond(cond, num_samples, batch)
            jv = (_call(denoiser, x + step * v, sigma, c) - _call(denoiser, x - step * v, sigma, c)) / (2 * step)
            total += (v * jv).sum(0)
        return total / num_samples

    l = torch.stack([1 - jacobian_diagonal(lam)
                     for lam in tqdm(lambdas.tolist(), desc="EMS l", disable=not progress, leave=False)]).cpu()
    l_slope = torch.gradient(l, spacing=(lambdas,), dim=0)[0]

    def regression(k: int, lam: float) -> tuple[Tensor, Tensor]:
        sigma, l_k, dl_k = math.exp(-lam), l[k].to(device, dtype), l_slope[k].to(device, dtype)
        f_all, df_all = [], []
        for batch in batches:
            x, c = data[batch] + sigma * noise[batch], _batch_cond(cond, num_samples, batch)
            x0 = _call(denoiser, x, sigma, c)
            velocity = x0 - x                                              # dx/dlambda
            ahead = _call(denoiser, x + fd_step * velocity, sigma * math.exp(-fd_step), c)
            behind = _call(denoiser, x - fd_step * velocity, sigma * math.exp(fd_step), c)
            f_all.append((1 - l_k) * x - x0)
            df_all.append(-dl_k * x + (1 - l_k) * velocity - (ahead - behind) / (2 * fd_step))
        f, df = torch.cat(f_all), torch.cat(df_all)
        f_centred, df_centred = f - f.mean(0), df - df.mean(0)
        variance = (f_centred ** 2).mean(0)
        # A ridge relative to E[f^2] keeps s finite (and ~0) where f is (nearly) deterministic (see ``ridge``).
        s = (f_centred * df_centred).mean(0) / (variance + ridge * (f ** 2).mean() + 1e-30)
        return s, df.mean(0) - s * f.mean(0)

    s_b = [regression(k, lam) for k, lam in tqdm(list(enumerate(lambdas.tolist())), desc="EMS s, b",
                                                 disable=not progress, leave=False)]
    s = torch.stack([pair[0] for pair in s_b]).cpu()
    b = torch.stack([pair[1] for pair in s_b]).cpu()
    return ModelStatistics(lambdas, l.to(torch.float64), s.to(torch.float64), b.to(torch.float64))
