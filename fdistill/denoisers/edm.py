"""EDM preconditioning (Karras et al. 2022, Sec. 5, Eq. 7 and Table 1) for networks fdistill trains itself.

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4

Diffusers' sinusoidal timestep embedding uses frequencies from 1 down to 1/10000 (``get_timestep_embedding``);
c_noise only spans about [-1.6, 1.1] for sigma in [0.002, 80], where all but the highest frequencies are
nearly constant. The network therefore receives ``TIMESTEP_SCALE * c_noise = 250 ln(sigma)`` (a span of ~2600,
like DDPM's 0..999), so the embedding resolves noise levels as it does for the timesteps it was designed for.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, append_dims, as_sigma_batch
from .features import FeatureMixin

TIMESTEP_SCALE = 1000.0


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for sigma [B]; each [B]."""
    total_var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / total_var
    c_out = sigma * sigma_data / total_var.sqrt()
    c_in = 1.0 / total_var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def class_count(net: nn.Module) -> int | None:
    """Real classes of a network with a class-embedding table of ``num_class_embeds`` rows (last row = null class)."""
    rows = getattr(getattr(net, "config", None), "num_class_embeds", None)
    return int(rows) - 1 if rows else None


def network_sample_shape(net: nn.Module) -> tuple[int, ...]:
    """Shape of one sample: (C, H, W) for 2-D models, (dim,) for point-data networks."""
    config = net.config
    if "dim" in config:
        return (int(config.dim),)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return (int(config.in_channels), int(height), int(width))


class EDMPrecond(FeatureMixin, nn.Module):
    """A network F(x_in, timestep, class_labels=...) (a diffusers ``UNet2DModel`` or fdistill's ``MLPNetwork``)
    preconditioned as an EDM denoiser.

    Args:
        net: the raw network. Class-conditional networks have ``num_class_embeds = num_classes + 1`` rows: the last
            one is the null class (label dropout / classifier-free guidance); ``cond=None`` means the null class.
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1], EDM).
        dtype: run the network in this dtype (bf16 / fp16); inputs, scalings and outputs stay float32.
        feature_block: sub-module read by ``features`` (default "mid_block", the UNet bottleneck).
        sigma_min, sigma_max: the noise range the network is meant for (EDM: 0.002, 80), read by samplers.

    Forward: x [B, *shape], sigma [B] -> x0 [B, *shape] float32 (float64 if x is float64).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, dtype: torch.dtype | None = None,
                 feature_block: str = "mid_block", sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.net = net if dtype is None else net.to(dtype)
        self.sigma_data = float(sigma_data)
        self.feature_block = feature_block
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.num_classes = class_count(net)
        self.conditioning = "class" if self.num_classes else "none"
        self.sample_shape = network_sample_shape(net)

    def null_condition(self, batch: int, like: Any = None) -> Tensor | None:
        """Null-class labels [batch] (= num_classes) for conditional networks, None otherwise."""
        return torch.full((batch,), self.num_classes, dtype=torch.long) if self.num_classes else None

    def uncond(self, cond: Tensor) -> Tensor | None:
        """The null condition matching ``cond``, for ClassifierFreeGuidance(uncond=wrapper.uncond)."""
        return self.null_condition(torch.as_tensor(cond).shape[0])

    def _labels(self, cond: Any, batch: int, device: torch.device) -> Tensor | None:
        if cond is None:
            labels = self.null_condition(batch)
            return None if labels is None else labels.to(device)
        if not self.num_classes:
            raise ValueError("this network is unconditional (num_class_embeds unset) but a condition was passed")
        return torch.as_tensor(cond, device=device).long()

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(out_dtype)
        sigma = as_sigma_batch(sigma, x).to(out_dtype)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        net_dtype = next(self.net.parameters()).dtype
        raw = self.net((c_in * x).to(net_dtype), (TIMESTEP_SCALE * c_noise).float(),
                       class_labels=self._labels(cond, x.shape[0], x.device))
        raw = getattr(raw, "sample", raw).to(out_dtype)
        return c_skip * x + c_out * raw
