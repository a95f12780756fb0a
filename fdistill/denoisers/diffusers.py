"""Diffusers models trained with a discrete VP (DDPM) schedule, or with rectified flow (``FlowMatchEulerDiscrete
Scheduler``: SD3, Flux; ``fdistill.denoisers.flow``), seen as denoisers in sigma units.

This module (with ``flow``) is the ONE place that knows diffusers timesteps and ``prediction_type``.

Discrete VP schedule (Ho et al. 2020): x_t = alpha_t x0 + s_t eps with alpha_t = sqrt(abar_t), s_t = sqrt(1 - abar_t),
t = 0 .. T-1. Dividing by alpha_t gives the VE form of EDM (Karras et al. 2022, Eq. 1 / Table 1 "VP"):

    x = x_t / alpha_t = x0 + sigma eps,   sigma(t) = s_t / alpha_t = sqrt((1 - abar_t) / abar_t),
    x_t = x / sqrt(1 + sigma^2)           (alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2)).

Raw outputs -> x0 (all in data units, the same x0 in both forms):
    epsilon:      x0 = x - sigma * eps                      (= (x_t - s eps) / alpha)
    v_prediction: v = alpha eps - s x0  =>  x0 = alpha x_t - s v   (Salimans & Ho 2022, Sec. 4; alpha^2 + s^2 = 1)
    sample:       x0 = output

Non-grid sigmas map to fractional timesteps by linear interpolation in log sigma (passed to the network as float,
its sinusoidal embedding is continuous); sigmas outside [sigma(0), sigma(T-1)] use the end timesteps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import LogSigmaTable, append_dims, as_sigma_batch
from .features import FeatureMixin
from .flow import FLOW_MODEL_CALLS, FLOW_SCHEDULERS, FlowMatchSchedule, flow_x0, flux_mu, is_flow_scheduler


def alphas_cumprod_from_scheduler(scheduler: Any) -> Tensor:
    """abar_t [T] (float64) of a diffusers scheduler object, or of a scheduler config (dict / FrozenDict).

    A config is turned into a ``DDPMScheduler`` so diffusers' own beta schedules (linear, scaled_linear,
    squaredcos_cap_v2, trained_betas, rescale_betas_zero_snr) are used rather than re-derived.
    """
    if not hasattr(scheduler, "alphas_cumprod"):
        from diffusers import DDPMScheduler
        config = dict(getattr(scheduler, "config", scheduler))
        scheduler = DDPMScheduler.from_config(config)
    return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)


def _x0_from_epsilon(x: Tensor, x_vp: Tensor, out: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return x - sigma * out


def _x0_from_v(x: Tensor, x_vp: Tensor, out: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * x_vp - (sigma * alpha) * out          # s = sigma * alpha


def _x0_from_sample(x: Tensor, x_vp: Tensor, out: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return out


# prediction_type -> f(x, x_vp, raw output, alpha, sigma) -> x0; alpha and sigma are broadcastable to x.
X0_FROM_PREDICTION: dict[str, Callable[..., Tensor]] = {
    "epsilon": _x0_from_epsilon,
    "v_prediction": _x0_from_v,
    "sample": _x0_from_sample,
}

# prediction_type -> the ``fdistill.losses.denoising`` weighting under which the x0 loss equals the network's own
# regression loss on its raw output: ||eps_hat - eps||^2 = ||x0_hat - x0||^2 / sigma^2, ||v_hat - v||^2 =
# ||x0_hat - x0||^2 (1 + sigma^2) / sigma^2 (both in the VP form x_t), sample: the x0 loss itself.
NATIVE_LOSS_WEIGHTING: dict[str, str] = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "x0"}

# scheduler classes whose config defines a discrete VP schedule (betas / alphas_cumprod)
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "UniPCMultistepScheduler", "DEISMultistepScheduler", "HeunDiscreteScheduler", "LCMScheduler",
                 "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "TCDScheduler")


def check_scheduler(config: dict, model_class: str) -> bool:
    """Whether ``config`` (a scheduler config) is a flow-matching one; ValueError, naming what was found and what is
    supported, for a scheduler class the wrapper does not understand or one that does not fit the model class."""
    name = config.get("_class_name")
    flow = is_flow_scheduler(config)
    if name is not None and not flow and name not in VP_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} not supported; supported: {sorted(VP_SCHEDULERS + FLOW_SCHEDULERS)}")
    if flow != (model_class in FLOW_MODEL_CALLS):
        expected = FLOW_SCHEDULERS if model_class in FLOW_MODEL_CALLS else VP_SCHEDULERS
        raise ValueError(f"a {model_class} with scheduler {name!r} is not supported: it needs one of {list(expected)}")
    return flow


class VPSchedule(LogSigmaTable):
    """sigma(t) of a discrete VP schedule and its inverse (fractional t by interpolation in log sigma).

    Args:
        alphas_cumprod: [T] abar_t, decreasing in t (float64 kept).
    """

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(min=1e-12)  # zero-SNR ends stay finite
        log_sigmas = 0.5 * torch.log((1 - abar) / abar)
        if not (log_sigmas[1:] > log_sigmas[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (sigma(t) increasing) to map sigma -> t")
        self.register_buffer("log_sigmas", log_sigmas)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Fractional timestep [B] (float32) for sigma [B] > 0, clamped to [0, T-1]."""
        log_sigmas = self.log_sigmas
        log_sigma = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lower = upper - 1
        weight = (log_sigma - log_sigmas[lower]) / (log_sigmas[upper] - log_sigmas[lower])
        return (lower + weight).float()


def _call_unet2d(net: nn.Module, x_in: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    return net(x_in, timestep, class_labels=cond).sample


def _call_unet2d_condition(net: nn.Module, x_in: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    """cond: encoder_hidden_states [B, L, D], or a dict with "encoder_hidden_states" and optionally
    "added_cond_kwargs" (SDXL: {"text_embeds": [B, D'], "time_ids": [B, 6]}) and "class_labels"."""
    if isinstance(cond, Tensor):
        cond = {"encoder_hidden_states": cond}
    if not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
        raise ValueError("UNet2DConditionModel needs cond = encoder_hidden_states [B, L, D] or a dict with "
                         "'encoder_hidden_states' (and 'added_cond_kwargs' for SDXL)")
    dtype = x_in.dtype
    added = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (cond.get("added_cond_kwargs") or {}).items()}
    return net(x_in, timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
               class_labels=cond.get("class_labels"), added_cond_kwargs=added or None).sample


def _call_dit(net: nn.Module, x_in: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    return net(x_in, timestep=timestep, class_labels=cond).sample


# Diffusers model class name -> how to call it with (input, float timestep [B], condition).
MODEL_CALLS: dict[str, Callable[[nn.Module, Tensor, Tensor, Any], Tensor]] = {
    "UNet2DModel": _call_unet2d,
    "UNet2DConditionModel": _call_unet2d_condition,
    "DiTTransformer2DModel": _call_dit,
    **FLOW_MODEL_CALLS,
}

# Default feature block per model class: the UNet bottleneck; for DiT the block in the middle of the stack.
DEFAULT_FEATURE_BLOCKS: dict[str, Callable[[nn.Module], str]] = {
    "UNet2DModel": lambda net: "mid_block",
    "UNet2DConditionModel": lambda net: "mid_block",
    "DiTTransformer2DModel": lambda net: f"transformer_blocks.{len(net.transformer_blocks) // 2}",
    # joint (MM-DiT) blocks return (text tokens, image tokens): their image-stream feed-forward gives the image tokens
    "SD3Transformer2DModel": lambda net: f"transformer_blocks.{len(net.transformer_blocks) // 2}.ff",
    "FluxTransformer2DModel": lambda net: f"transformer_blocks.{len(net.transformer_blocks) // 2}.ff",
}


def model_class_name(net: nn.Module) -> str:
    """The supported diffusers class ``net`` is an instance of (subclasses count)."""
    for cls in type(net).__mro__:
        if cls.__name__ in MODEL_CALLS:
            return cls.__name__
    raise TypeError(f"unsupported model class {type(net).__name__}; supported: {sorted(MODEL_CALLS)}")


def conditioning_type(net: nn.Module) -> str:
    """"none", "class" (labels [B] long, null class = num_classes) or "text" (encoder_hidden_states)."""
    name = model_class_name(net)
    if name == "UNet2DConditionModel" or name in FLOW_MODEL_CALLS:
        return "text"
    if name == "DiTTransformer2DModel":
        return "class"
    return "class" if getattr(net.config, "num_class_embeds", None) else "none"


def num_classes_of(net: nn.Module) -> int | None:
    """Number of real classes of a class-conditional network (its null/CFG class index), else None."""
    if conditioning_type(net) != "class":
        return None
    if model_class_name(net) == "DiTTransformer2DModel":
        return int(net.config.num_embeds_ada_norm)        # the embedding table has one more row: the null class
    return int(net.config.num_class_embeds) - 1           # fdistill convention: last embedding row = null class


def expand_null(null: Any, batch: int) -> Any:
    """Repeat a [1, ...] null condition (tensor, or dict of tensors / dicts) to batch size ``batch``."""
    if isinstance(null, dict):
        return {key: expand_null(value, batch) for key, value in null.items()}
    return null.expand(batch, *null.shape[1:]) if null.shape[0] == 1 else null


def disable_implicit_label_dropout(net: nn.Module) -> None:
    """DiT's LabelEmbedding replaces labels by the null class at random in training mode; fdistill methods do label
    dropout themselves (passing the null class), so a training-mode forward must not drop labels behind their back."""
    from diffusers.models.embeddings import LabelEmbedding
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def condition_batch_size(cond: Any) -> int:
    """Batch size of a condition: labels [B], embeddings [B, L, D], or a dict holding encoder_hidden_states."""
    return (cond["encoder_hidden_states"] if isinstance(cond, dict) else torch.as_tensor(cond)).shape[0]


def to_device(cond: Any, device: torch.device) -> Any:
    """Move a condition (tensor, dict of tensors / dicts, or None) to ``device``."""
    if isinstance(cond, dict):
        return {key: to_device(value, device) for key, value in cond.items()}
    return cond.to(device) if isinstance(cond, Tensor) else cond


class DiffusersDenoiser(FeatureMixin, nn.Module):
    """A diffusers UNet2DModel / UNet2DConditionModel / DiTTransformer2DModel with its VP scheduler, or an
    SD3Transformer2DModel / FluxTransformer2DModel with its ``FlowMatchEulerDiscreteScheduler``, as a denoiser.

    Args:
        net: the diffusers model.
        scheduler: its scheduler (object or config dict); read for ``prediction_type`` and ``alphas_cumprod`` (VP), or
            for the shift of its training times (flow matching, ``fdistill.denoisers.flow``).
        dtype: run the network in this dtype (e.g. torch.bfloat16); inputs and outputs stay float32.
        feature_block: sub-module whose output ``features`` returns (default: mid_block; DiT: middle block).
        null_cond: the null condition of text models for classifier-free guidance (e.g. the empty-prompt
            encoder_hidden_states [1, L, D], or for SDXL a dict with [1, ...] tensors); class models use the null
            class ``num_classes``.
        mu: Flux's resolution-dependent shift (schedulers with ``use_dynamic_shifting`` only; default: at the
            ``sample_size``).
        sample_size: side of one sample in latent pixels, the size the model is trained / sampled at (default: the
            network config's ``sample_size``; Flux, whose config has none: FluxPipeline's 128, i.e. 1024 px).

    Attributes:
        loss_weighting: the ``fdistill.losses.denoising.weighted_denoising_loss`` weighting that reproduces the
            network's training loss on its ``prediction_type`` (``NATIVE_LOSS_WEIGHTING``).

    Forward: x [B, C, H, W] = x0 + sigma eps, sigma [B] -> x0 [B, C, H, W] (float32; float64 if x is float64).
    If the network predicts a learned variance too (out_channels = 2 * in_channels, DiT / IF), the second half of
    its channels is dropped.
    """

    def __init__(self, net: nn.Module, scheduler: Any, dtype: torch.dtype | None = None,
                 feature_block: str | None = None, null_cond: Any = None, mu: float | None = None,
                 sample_size: int | None = None):
        super().__init__()
        self.model_class = model_class_name(net)
        config = getattr(scheduler, "config", scheduler)
        if hasattr(scheduler, "config"):        # an object's config names its class only once saved
            config = {**config, "_class_name": type(scheduler).__name__}
        self.flow = check_scheduler(config, self.model_class)
        # flow matching: the network predicts the velocity eps - x0 ("flow_prediction" in Diffusers' configs)
        self.prediction_type = "flow_prediction" if self.flow else config.get("prediction_type", "epsilon")
        if not self.flow and self.prediction_type not in X0_FROM_PREDICTION:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} not supported; "
                             f"allowed: {sorted(X0_FROM_PREDICTION)}")
        self.loss_weighting = "flow_velocity" if self.flow else NATIVE_LOSS_WEIGHTING[self.prediction_type]
        self.scheduler_config = dict(config)
        self.net = net if dtype is None else net.to(dtype)
        disable_implicit_label_dropout(net)
        self.feature_block = feature_block or DEFAULT_FEATURE_BLOCKS[self.model_class](net)
        self.conditioning = conditioning_type(net)
        self.num_classes = num_classes_of(net)
        self.null_cond = null_cond
        in_channels = net.config.in_channels
        if self.model_class == "FluxTransformer2DModel":   # packed 2x2 patches; no sample_size: FluxPipeline's 128
            in_channels, side = in_channels // 4, sample_size or 128
        else:
            side = sample_size or net.config.sample_size
        self.sample_shape = (in_channels, side, side)
        if self.flow and mu is None and config.get("use_dynamic_shifting"):
            mu = flux_mu((side // 2) ** 2, config)       # Flux's shift at the sample size (1024 px: 4096 tokens)
        self.schedule = FlowMatchSchedule(dict(config), mu) if self.flow else \
            VPSchedule(alphas_cumprod_from_scheduler(scheduler))

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def train_sigmas(self) -> Tensor:
        """[T] float64 sigma of each integer training timestep t = 0..T-1 (increasing in t)."""
        return self.schedule.log_sigmas.exp()

    def null_condition(self, batch: int, like: Any = None) -> Any:
        """The null (unconditional) condition for ``batch`` samples: the null class ``num_classes`` for class models,
        ``null_cond`` repeated for text models (SDXL keeps the image-size ``time_ids`` of ``like``), None otherwise."""
        if self.conditioning == "class":
            return torch.full((batch,), self.num_classes, dtype=torch.long)
        if self.conditioning == "none":
            return None
        if self.null_cond is None:
            raise ValueError(f"{self.model_class} has no null condition: pass null_cond= (e.g. the encoded empty "
                             "prompt) to DiffusersDenoiser for classifier-free guidance or unconditional calls")
        null = expand_null(self.null_cond, batch)
        if isinstance(like, dict) and "added_cond_kwargs" in like:
            null = {**null, "added_cond_kwargs": {**null.get("added_cond_kwargs", {}),
                                                  "time_ids": like["added_cond_kwargs"]["time_ids"]}}
        return null

    def uncond(self, cond: Any) -> Any:
        """The null condition matching ``cond`` (same batch size), for ClassifierFreeGuidance(uncond=wrapper.uncond)."""
        return self.null_condition(condition_batch_size(cond), like=cond)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = as_sigma_batch(sigma, x).to(out_dtype)
        if self.flow:
            return self._flow_forward(x.to(out_dtype), sigma, cond)
        alpha = append_dims(1.0 / torch.sqrt(1.0 + sigma ** 2), x.ndim)
        x = x.to(out_dtype)
        x_vp = x * alpha
        net_dtype = self.net.dtype
        raw = MODEL_CALLS[self.model_class](self.net, x_vp.to(net_dtype), self.schedule.timestep(sigma),
                                            to_device(self.null_condition(x.shape[0]) if cond is None else cond, x.device))
        raw = raw[:, : x.shape[1]].to(out_dtype)      # learned-variance channels dropped
        return X0_FROM_PREDICTION[self.prediction_type](x, x_vp, raw, alpha, append_dims(sigma, x.ndim))

    def _flow_forward(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """x0 = x_t - t v with x_t = x / (1 + sigma), t = sigma / (1 + sigma) (``fdistill.denoisers.flow``)."""
        time = append_dims(self.schedule.time(sigma), x.ndim)
        x_t = x / (1 + append_dims(sigma, x.ndim))      # not x (1 - t): 1 - t cancels near t = 1 (sigma ~ 3000)
        cond = to_device(self.null_condition(x.shape[0]) if cond is None else cond, x.device)
        velocity = MODEL_CALLS[self.model_class](self.net, x_t.to(self.net.dtype), self.schedule.timestep(sigma), cond)
        return flow_x0(x_t, velocity.to(x.dtype), time)
