"""Rectified-flow (flow-matching) Diffusers models seen as denoisers in sigma units: SD3 and Flux transformers with
``FlowMatchEulerDiscreteScheduler``.

Rectified flow (Liu et al. 2023; SD3: Esser et al. 2024, Eq. 3 and Sec. 3.1) interpolates linearly,

    x_t = (1 - t) x0 + t eps,   t in [0, 1],

and the network predicts the velocity v = dx_t/dt = eps - x0. Dividing by (1 - t) gives the VE form of EDM
(Karras et al. 2022, Eq. 1):

    x = x_t / (1 - t) = x0 + sigma eps,   sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_t = x / (1 + sigma),

and the velocity gives x0 = x_t - t v. Deterministic Euler steps in x_t are DDIM steps (x_t is linear in t for fixed
x0, eps), so Euler in sigma on x reproduces the scheduler's Euler steps exactly.

The scheduler's shift (SD3 Eq. 23, ``shift`` = alpha: t_m = alpha t_n / (1 + (alpha - 1) t_n); Flux: the
resolution-dependent ``mu`` of ``use_dynamic_shifting``, t_m = e^mu / (e^mu + (1 / t_n - 1))) moves the training and
sampling times towards noise. It does not change the x0 conversion above, only the table of training times
(``FlowMatchSchedule.log_sigmas``) and so the default noise range and time-uniform sampling grids.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import LogSigmaTable

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(config: dict) -> bool:
    """Whether a scheduler config (``scheduler.config`` or scheduler_config.json) is a flow-matching one."""
    return config.get("_class_name") in FLOW_SCHEDULERS


def shifted_times(times: Tensor, config: dict, mu: float | None = None) -> Tensor:
    """The scheduler's shift of times in (0, 1]: SD3's ``shift`` alpha (Eq. 23), or with ``use_dynamic_shifting``
    Flux's exponential time shift e^mu / (e^mu + 1 / t - 1) (``mu`` required)."""
    if config.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("a scheduler with use_dynamic_shifting (Flux) needs mu, the resolution-dependent shift "
                             "(fdistill.denoisers.flow.flux_mu)")
        return math.exp(mu) / (math.exp(mu) + (1 / times - 1))
    shift = float(config.get("shift", 1.0))
    return shift * times / (1 + (shift - 1) * times)


def flux_mu(image_seq_len: int, config: dict) -> float:
    """Flux's resolution-dependent shift mu: linear in the number of packed latent tokens, from ``base_shift`` at
    ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (the scheduler config's fields; FluxPipeline)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


class FlowMatchSchedule(LogSigmaTable):
    """The training times of a ``FlowMatchEulerDiscreteScheduler`` in sigma units, and sigma -> network timestep.

    The scheduler trains on t_i = shift(i / T), i = 1 .. T; the table keeps i = 1 .. T - 1 (t_T = 1 is sigma =
    infinity, pure noise, which the VE form cannot hold), so sigma_max = sigma(shift((T - 1) / T)).

    Args:
        config: the scheduler config (num_train_timesteps, shift, use_dynamic_shifting, ...).
        mu: Flux's resolution-dependent shift (``use_dynamic_shifting`` only).
    """

    def __init__(self, config: dict, mu: float | None = None):
        super().__init__()
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        steps = self.num_train_timesteps
        times = shifted_times(torch.arange(1, steps, dtype=torch.float64) / steps, config, mu)
        self.register_buffer("log_sigmas", torch.log(times / (1 - times)))

    def time(self, sigma: Tensor) -> Tensor:
        """Flow time t = sigma / (1 + sigma) in [0, 1) for sigma [B] >= 0 (float64 kept)."""
        return sigma / (1 + sigma)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep [B] (float32): t * num_train_timesteps, as the pipelines pass it."""
        return (self.time(sigma.to(torch.float64)) * self.num_train_timesteps).float()


def _call_sd3(net: nn.Module, x_in: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    """cond: {"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]} (``fdistill.flow_pipelines``)."""
    if not isinstance(cond, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(cond):
        raise ValueError("SD3Transformer2DModel needs cond = {'encoder_hidden_states': [B, L, D], "
                         "'pooled_projections': [B, P]}")
    dtype = x_in.dtype
    return net(hidden_states=x_in, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
               pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]


def pack_latents(latents: Tensor) -> Tensor:
    """Flux's 2x2 patch packing: [B, C, H, W] -> [B, (H / 2) (W / 2), 4 C] (as FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latents``: [B, (H / 2) (W / 2), 4 C] -> [B, C, H, W] (H, W in latent pixels)."""
    b, _, channels = packed.shape
    patches = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """Flux's positional ids of the packed latent tokens [(H / 2) (W / 2), 3]: (0, row, column)."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def _call_flux(net: nn.Module, x_in: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    """cond: {"encoder_hidden_states": T5 states [B, L, D], "pooled_projections": CLIP pooled [B, P], and
    "guidance": [B] for guidance-distilled models}. Flux's transformer multiplies its timestep by 1000 itself."""
    if not isinstance(cond, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(cond):
        raise ValueError("FluxTransformer2DModel needs cond = {'encoder_hidden_states': [B, L, D], "
                         "'pooled_projections': [B, P]} (+ 'guidance': [B] for guidance-distilled models)")
    dtype, (height, width) = x_in.dtype, x_in.shape[-2:]
    states = cond["encoder_hidden_states"].to(dtype)
    guidance = cond.get("guidance") if net.config.guidance_embeds else None
    out = net(hidden_states=pack_latents(x_in), timestep=timestep / 1000, encoder_hidden_states=states,
              pooled_projections=cond["pooled_projections"].to(dtype),
              guidance=None if guidance is None else guidance.to(dtype),
              txt_ids=torch.zeros(states.shape[1], 3, device=x_in.device, dtype=dtype),
              img_ids=image_ids(height, width, x_in.device).to(dtype), return_dict=False)[0]
    return unpack_latents(out, height, width)


FLOW_MODEL_CALLS = {"SD3Transformer2DModel": _call_sd3, "FluxTransformer2DModel": _call_flux}


def flow_x0(x_t: Tensor, velocity: Tensor, time: Tensor) -> Tensor:
    """x0 = x_t - t v (v = eps - x0); ``time`` broadcastable to x_t."""
    return x_t - time * velocity
