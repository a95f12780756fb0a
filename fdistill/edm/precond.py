"""Preconditioning of the EDM / EDM2 networks (Karras et al. 2022, Eq. 7 and Table 1) and the denoiser that puts one
of them behind fdistill's protocol ``D(x, sigma, cond) -> x0``:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)

    kind   c_skip                  c_out                      c_in                   c_noise
    "edm"  sd^2 / (sigma^2 + sd^2) sigma sd / sqrt(s^2+sd^2)  1 / sqrt(sigma^2+sd^2) ln(sigma) / 4      (EDM, EDM2)
    "vp"   1                       -sigma                     1 / sqrt(sigma^2 + 1)  (M - 1) sigma_vp^-1(sigma)
    "ve"   1                       sigma                      1                      ln(sigma / 2)

with sd = sigma_data and, for VP (Song et al. 2021), sigma_vp(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and
its inverse sigma_vp^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d.
EDM2's network also has a log-variance head (the uncertainty u(sigma) of its loss weighting, Eq. 21); it is only
used in training and is not part of these models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoisers.base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, append_dims, as_sigma_batch
from ..denoisers.edm import edm_scalings
from ..denoisers.features import FeatureMixin

PRECOND_KINDS = ("edm", "vp", "ve")


@dataclass(frozen=True)
class Preconditioning:
    """Which row of EDM Table 1, with its constants.

    Attributes:
        kind: "edm" (EDM and EDM2 networks), "vp" or "ve" (EDM's baselines of Song et al. 2021).
        sigma_data: data standard deviation ("edm"; 0.5 for images in [-1, 1]).
        beta_d, beta_min, M: VP schedule constants and the number of discrete training times ("vp").
        sigma_min, sigma_max: the noise range samplers use (EDM's sampler: 0.002 and 80).
    """

    kind: str = "edm"
    sigma_data: float = 0.5
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX

    def __post_init__(self):
        if self.kind not in PRECOND_KINDS:
            raise ValueError(f"preconditioning kind must be one of {list(PRECOND_KINDS)}, got {self.kind!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def vp_sigma_inverse(self, sigma: Tensor) -> Tensor:
        """The VP time t in [0, 1] whose noise level is sigma (EDM Table 1, sigma^-1 of the VP column)."""
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each [B], for sigma [B]."""
        if self.kind == "edm":
            return edm_scalings(sigma, self.sigma_data)
        ones = torch.ones_like(sigma)
        if self.kind == "vp":
            return ones, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.vp_sigma_inverse(sigma)
        return ones, sigma, ones, (0.5 * sigma).log()


class EDMNetworkDenoiser(FeatureMixin, nn.Module):
    """An EDM / EDM2 network F (``SongUNet``, ``DhariwalUNet``, ``EDM2UNet``) preconditioned as a denoiser.

    Args:
        net: the raw network, called as net(c_in x, c_noise, one-hot labels [B, label_dim] or None).
        precond: the preconditioning (``Preconditioning``).
        label_dim: classes of a class-conditional network (0 = unconditional).
        dtype: run the network in this dtype (bf16 / fp16); inputs, scalings and outputs stay float32.
        feature_block: sub-module read by ``features`` (default: the network's bottleneck block).

    ``cond``: class indices [B] long, where index ``num_classes`` (and ``cond=None``) is the all-zero label vector,
    the null class of networks trained with label dropout; or one-hot / soft labels [B, num_classes] float.
    Forward: x [B, C, H, W], sigma [B] -> x0 [B, C, H, W] float32 (float64 if x is float64).
    """

    def __init__(self, net: nn.Module, precond: Preconditioning, label_dim: int = 0,
                 dtype: torch.dtype | None = None, feature_block: str | None = None):
        super().__init__()
        self.net = net if dtype is None else net.to(dtype)
        self.precond = precond
        self.feature_block = feature_block or net.bottleneck
        self.sigma_min, self.sigma_max = precond.sigma_min, precond.sigma_max
        self.num_classes = int(label_dim) or None
        self.conditioning = "class" if self.num_classes else "none"
        self.sample_shape = tuple(net.sample_shape)

    def null_condition(self, batch: int, like: Any = None) -> Tensor | None:
        """Null-class labels [batch] (= num_classes) for conditional networks, None otherwise."""
        return torch.full((batch,), self.num_classes, dtype=torch.long) if self.num_classes else None

    def uncond(self, cond: Tensor) -> Tensor | None:
        """The null condition matching ``cond``, for ClassifierFreeGuidance(uncond=wrapper.uncond)."""
        return self.null_condition(torch.as_tensor(cond).shape[0])

    def one_hot_labels(self, cond: Any, batch: int, device: torch.device) -> Tensor | None:
        """The network's label input [B, num_classes] float32 (None for unconditional networks)."""
        if not self.num_classes:
            if cond is not None:
                raise ValueError("this network is unconditional (label_dim 0) but a condition was passed")
            return None
        if cond is None:
            return torch.zeros(batch, self.num_classes, device=device)
        cond = torch.as_tensor(cond, device=device)
        if cond.is_floating_point():
            return cond.float().reshape(batch, self.num_classes)
        return F.one_hot(cond.long(), self.num_classes + 1)[:, :self.num_classes].float()

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(out_dtype)
        sigma = as_sigma_batch(sigma, x).to(out_dtype)
        c_skip, c_out, c_in, c_noise = self.precond.scalings(sigma)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        net_dtype = next(self.net.parameters()).dtype
        raw = self.net((c_in * x).to(net_dtype), c_noise.float(), self.one_hot_labels(cond, x.shape[0], x.device))
        return c_skip * x + c_out * raw.to(out_dtype)
