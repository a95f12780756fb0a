"""Method ``diffusion_dpo``: preference tuning of Stable Diffusion 1.5 / SDXL with Diffusion-DPO (Wallace et al.
2023, arXiv 2311.12908, Eq. 14), or the supervised baseline (SFT: denoising loss on the winners only).

The model is held as a ``fdistill.pipelines.StableDiffusionComponent`` (conditioning, VAE, denoiser, export). The
loss is the paper's: latents z0, one training timestep t ~ U{0, ..., T-1} and one noise eps per pair shared by
winner and loser, and the network's own regression loss on its ``prediction_type`` (eps, v or z0). It is computed
through the denoiser protocol as the equal weighted x0 loss (``fdistill.losses.denoising``; the wrapper's
``loss_weighting``) at sigma(t), so this module knows no prediction type. The reference is a frozen copy of the UNet
(full fine-tuning) or, in LoRA mode, the SAME UNet with its adapters disabled (no second UNet in memory).
The encoded-data cache: ``fdistill.methods.dpo_cache``; evaluation: ``fdistill.methods.dpo_eval``.

Configured by ``DiffusionDPOConfig`` (``conf/method/diffusion_dpo.yaml``); built by ``build(config, model, data)``
where ``model`` is a ``fdistill.pipelines.SDComponents`` and ``data`` a preference DataSource
(``fdistill.data.preference``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..losses.denoising import noisy_sample, table_sigmas, weighted_denoising_loss
from ..losses.dpo import diffusion_dpo_loss, dpo_logits, sft_loss
from ..flow_pipelines import FluxComponents, SD3Components
from ..latent_component import latent_component
from ..pipelines import SDComponents
from ..samplers.config import SamplerConfig
from ..validation import require
from .base import Method, Phase, StepContext, check_optimizer_fields
from .dpo_cache import cached_dataset

FINETUNE_MODES = ("full", "lora")
MICRO_CONDITIONINGS = ("resolution", "data")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class DiffusionDPOConfig:
    """Settings of the ``diffusion_dpo`` method (``method.<field>=...``).

    Attributes:
        objective: 'dpo' (Diffusion-DPO, Eq. 14) or 'sft' (plain denoising loss on the preferred images only).
        beta: DPO KL strength beta (> 0); the paper's text: 2000 for SD1.5, 5000 for SDXL (the released launchers
            pass 5000 for both).
        finetune: 'full' (train every UNet weight, reference = frozen copy) or 'lora' (train LoRA adapters on
            the attention projections; reference = the same UNet with adapters disabled).
        lora_rank: LoRA rank r (>= 1).
        lora_alpha: LoRA scaling numerator (> 0; the update is scaled by lora_alpha / lora_rank).
        lora_targets: UNet sub-module names that get adapters (default: attention q, k, v, out projections).
        lr: learning rate (> 0). With ``scale_lr`` false (default) it is the optimizer's LR itself; with
            ``scale_lr`` true it is an LR PER PAIR of the global batch, and the optimizer runs at
            lr x train.batch_size, i.e. lr x gradient-accumulation steps x per-device batch x processes, which is
            what the released code's ``--scale_lr`` does (its launchers: 1e-8 x 2048 pairs = 2.048e-5).
        scale_lr: scale ``lr`` by the global batch (above).
        optimizer: one of 'adamw', 'adam', 'adafactor' (SDXL in the paper: Adafactor).
        weight_decay: decoupled weight decay (>= 0; the released script uses 1e-2).
        betas: Adam betas, two values in [0, 1).
        max_grad_norm: gradient clipping (> 0) or null.
        gradient_checkpointing: recompute UNet activations in backward (less memory, ~30 % slower).
        sdxl_micro_conditioning: SDXL's time ids (original size, crop top-left, target size):
            'resolution' = [res, res, 0, 0, res, res] for every image, as the paper's released training code does;
            'data' = each image's stored size and crop offsets (the Diffusers SDXL training example). SD1.5: unused.
        vae_sample: encode images with a draw from the VAE posterior (the released script) instead of its mean
            (default: the mean; SD's posterior std is negligible, and the mean keeps winner and loser free of
            independent encoding noise and the cache deterministic).
        cache_path: if set, VAE latents and text embeddings of the whole data set are computed once and stored
            in this file (reused when it exists); training then reads the cache. Crops, flips and empty captions
            are then fixed at caching time.
        prompts: prompts of ``generate`` when no condition is given (null = the data's ``extras["prompts"]``,
            else ["a photo"]).
        sampler: the multi-step sampler of ``generate`` (solver, steps, schedule, classifier-free guidance
            ``guidance``); null = the top-level ``sampler`` group (``SamplerConfig()`` outside Hydra).
    """

    objective: str = "dpo"
    beta: float = 2000.0
    finetune: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lr: float = 2.048e-5
    scale_lr: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    sdxl_micro_conditioning: str = "resolution"
    vae_sample: bool = False
    cache_path: str | None = None
    prompts: list[str] | None = None
    sampler: SamplerConfig | None = None

    def __post_init__(self):
        check_optimizer_fields(self)
        require(self.objective in OBJECTIVES, f"method.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        require(self.beta > 0, f"method.beta must be > 0, got {self.beta}")
        require(self.finetune in FINETUNE_MODES, f"method.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        require(self.lora_rank >= 1, f"method.lora_rank must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha > 0, f"method.lora_alpha must be > 0, got {self.lora_alpha}")
        require(len(self.lora_targets) > 0, "method.lora_targets must name at least one module")
        require(self.sdxl_micro_conditioning in MICRO_CONDITIONINGS, f"method.sdxl_micro_conditioning must be one of "
                f"{MICRO_CONDITIONINGS}, got {self.sdxl_micro_conditioning!r}")
        if isinstance(self.sampler, dict):  # built from plain Python rather than through Hydra
            self.sampler = SamplerConfig(**self.sampler)
        self._global_batch: int | None = None

    def check_train(self, train) -> None:
        """Record the global batch (``train.batch_size``) that ``scale_lr`` multiplies ``lr`` by
        (``fdistill.config.compose`` calls this with the TrainConfig)."""
        self._global_batch = int(train.batch_size)

    def optimizer_lr(self) -> float:
        """The optimizer's LR: ``lr``, or ``lr`` x the global batch in pairs with ``scale_lr``."""
        if not self.scale_lr:
            return self.lr
        if self._global_batch is None:
            raise ValueError("method.scale_lr=true needs the global batch: call config.check_train(train_config) "
                             "(fdistill.config.compose does)")
        return self.lr * self._global_batch


# --------------------------------------------------------------------------------------------- objectives

def _dpo_objective(errors: dict[str, Tensor], beta: float) -> Tensor:
    return diffusion_dpo_loss(errors["model_w"], errors["model_l"], errors["ref_w"], errors["ref_l"], beta)


def _sft_objective(errors: dict[str, Tensor], beta: float) -> Tensor:
    return sft_loss(errors["model_w"])


# objective -> (per-pair loss from the errors, whether it needs the loser and reference passes)
OBJECTIVES: dict[str, tuple[Callable[[dict[str, Tensor], float], Tensor], bool]] = {
    "dpo": (_dpo_objective, True),
    "sft": (_sft_objective, False),
}


class DiffusionDPO(Method):
    """Diffusion-DPO / SFT on a Stable Diffusion UNet.

    Networks: ``networks["unet"]`` (trained: all weights, or only its LoRA adapters); frozen: ``vae``,
    ``text_encoder`` (+ ``text_encoder_2`` for SDXL) and, in full mode, ``reference`` (a copy of the initial UNet).

    Args:
        config: DiffusionDPOConfig.
        components: the Stable Diffusion parts (``fdistill.pipelines``).
        image_size: training resolution in pixels (H, W).
        prompts: default prompts of ``generate``.
    """

    def __init__(self, config: DiffusionDPOConfig, components: SDComponents, image_size: tuple[int, int],
                 prompts: list[str] | None = None):
        super().__init__()
        self.config = config
        self.sd = latent_component(components, image_size)
        self.sampler = config.sampler or SamplerConfig()
        self.prompts = list(config.prompts or prompts or ["a photo"])
        for name, module in self.sd.frozen_modules().items():
            self.frozen[name] = module.requires_grad_(False).eval()
        unet = components.unet
        self._denoisers = {"model": self.sd.denoiser(unet)}   # fails now on a prediction_type it does not know
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.finetune == "lora":
            self._add_lora(unet)
        else:
            self.frozen["reference"] = copy.deepcopy(unet).requires_grad_(False).eval()
        self.networks["unet"] = unet

    def _add_lora(self, unet: nn.Module) -> None:
        from peft import LoraConfig

        c = self.config
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets),
                                    init_lora_weights=True))     # B = 0: the tuned model starts AT the reference

    # ------------------------------------------------------------------------------------- contract

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("model", ("unet",), lr=c.optimizer_lr(), weight_decay=c.weight_decay, betas=tuple(c.betas),
                      max_grad_norm=c.max_grad_norm, optimizer=c.optimizer)]

    @contextlib.contextmanager
    def reference_unet(self) -> Iterator[nn.Module]:
        """The reference model: the frozen copy (full mode) or the trained UNet with adapters disabled (LoRA)."""
        if self.config.finetune == "full":
            yield self.frozen["reference"]
            return
        unet = self.networks["unet"]
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    # ------------------------------------------------------------------------------------- conditioning

    def text_conditioning(self, captions: list[str], batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """UNet keyword arguments for ``captions`` (SDXL: time ids of ``batch``, else [res, res, 0, 0, res, res])."""
        return self.sd.conditioning(captions, batch)

    def encode_batch(self, item: dict[str, Any]) -> dict[str, Any]:
        """Latents of winner / loser and the UNet conditioning of a batch (raw images or a cached batch)."""
        if "latents_w" in item:
            return {"latents_w": item["latents_w"], "latents_l": item["latents_l"],
                    "cond": self.sd.conditioning_from_tensors(item)}
        from_data, sample = self.config.sdxl_micro_conditioning == "data", self.config.vae_sample
        return {"latents_w": self.sd.encode(item["x_w"], sample), "latents_l": self.sd.encode(item["x_l"], sample),
                "cond": self.text_conditioning(item["caption"], item if from_data else None)}

    # ------------------------------------------------------------------------------------- loss

    def errors(self, encoded: dict[str, Any], generator: torch.Generator | None = None,
               pairs: bool | None = None) -> dict[str, Tensor]:
        """Per-pair errors of the model ('model_w', 'model_l') and the reference ('ref_w', 'ref_l'), each [B],
        at one shared training timestep and noise per pair. ``pairs`` False (default for SFT): only 'model_w'.
        ``generator`` (CPU) fixes t and eps.

        The error is the network's regression loss on its prediction type, mean over C, H, W (Eq. 14's
        ||eps - eps_theta(x_t, t)||^2 for an eps model), as the weighted x0 loss of its denoiser at sigma(t)."""
        latents_w = encoded["latents_w"]
        needs_pairs = OBJECTIVES[self.config.objective][1] if pairs is None else pairs
        latents = torch.cat([latents_w, encoded["latents_l"]]) if needs_pairs else latents_w
        batch, device, repeats = latents_w.shape[0], latents_w.device, latents.shape[0] // latents_w.shape[0]
        model = self._training_denoiser("model", self.networks["unet"])
        sigma = table_sigmas(batch, model.train_sigmas.cpu(), generator).to(device).repeat(repeats)
        noise = torch.randn(latents_w.shape, generator=generator).to(device).repeat(repeats, 1, 1, 1)
        noisy, cond = noisy_sample(latents, sigma, noise), _repeat(encoded["cond"], repeats)

        def errors_of(denoiser: nn.Module) -> Tensor:
            return weighted_denoising_loss(denoiser(noisy, sigma, cond), latents, sigma, denoiser.loss_weighting)

        errors = errors_of(model)
        if not needs_pairs:
            return {"model_w": errors}
        with torch.no_grad(), self.reference_unet() as reference:
            ref = errors_of(self._training_denoiser("reference", reference))
        return {"model_w": errors[:batch], "model_l": errors[batch:], "ref_w": ref[:batch], "ref_l": ref[batch:]}

    def _training_denoiser(self, role: str, net: nn.Module) -> nn.Module:
        """``sd.denoiser(net)``, kept while ``role`` ('model' / 'reference') is played by the same network on the
        same device: building one walks the network's modules, and FSDP may swap in a gathered copy of the UNet."""
        denoiser = self._denoisers.get(role)
        if denoiser is None or denoiser.net is not net or denoiser.train_sigmas.device != next(net.parameters()).device:
            denoiser = self._denoisers[role] = self.sd.denoiser(net)
        return denoiser

    def loss(self, phase: str, item: dict[str, Any], ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        errors = self.errors(self.encode_batch(item))
        objective = OBJECTIVES[self.config.objective][0]
        loss = objective(errors, self.config.beta).mean()
        return loss, {"loss": loss.item(), **pair_statistics(errors, self.config.beta)}

    # ------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_images(self, prompts: list[str], generator: torch.Generator | None = None,
                      reference: bool = False) -> Tensor:
        """Images [N, 3, H, W] in [-1, 1] for ``prompts`` from the tuned model (or the reference model):
        fdistill sampler in latent space, then the VAE decoder. Same generator state -> same initial noise."""
        from .. import samplers

        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(self.reference_unet()) if reference else self.networks["unet"]
            denoiser = self.sd.sampling_denoiser(unet, self.sampler.guidance)
            device = next(unet.parameters()).device
            schedule = samplers.noise_levels(self.sampler, denoiser).to(device)
            noise = torch.randn(self.sd.latent_shape(len(prompts)), generator=generator).to(device) * schedule[0]
            latents = samplers.sample(denoiser, noise, schedule, solver=self.sampler.solver,
                                      cond=self.text_conditioning(prompts))
        return self.sd.decode(latents)

    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` images for the prompts ``cond`` (list of str) or, by default, the configured prompts in turn."""
        prompts = list(cond) if cond is not None else [self.prompts[i % len(self.prompts)] for i in range(num)]
        return self.sample_images(prompts[:num], generator)

    # ------------------------------------------------------------------------------------- export

    def export(self, directory: str | Path) -> None:
        """LoRA mode: ``pytorch_lora_weights.safetensors`` in Diffusers format (``pipe.load_lora_weights(dir)``),
        its base pipeline (hub id or directory; null for in-memory components) in ``fdistill_dpo.json``
        ``base_model``: ``fdistill sample --model dir`` loads the base and applies the LoRA.
        Full mode: a complete Diffusers pipeline directory with the tuned UNet (``Pipeline.from_pretrained(dir)``;
        the UNet alone loads with ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``)."""
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        unet = self.networks["unet"]
        if self.config.finetune == "full":
            self.sd.save_pipeline(directory, unet)
        else:
            self.sd.save_lora(directory, unet)
        with open(os.path.join(directory, "fdistill_dpo.json"), "w") as f:
            json.dump({"method": "diffusion_dpo", "kind": self.sd.kind, "finetune": self.config.finetune,
                       "objective": self.config.objective, "beta": self.config.beta,
                       "base_model": self.sd.source}, f, indent=2)


def _repeat(value: Any, repeats: int) -> Any:
    """Stack a conditioning tensor (or dict of tensors) ``repeats`` times along the batch."""
    if isinstance(value, dict):
        return {k: _repeat(v, repeats) for k, v in value.items()}
    return torch.cat([value] * repeats) if repeats > 1 else value


def pair_statistics(errors: dict[str, Tensor], beta: float) -> dict[str, float]:
    """Scalars to log: implicit reward accuracy (share with model_diff < ref_diff), mean model / reference
    error differences and the mean DPO logit (SFT: the winners' error only)."""
    if "ref_w" not in errors:
        return {"err_w": errors["model_w"].mean().item()}
    model_diff, ref_diff = errors["model_w"] - errors["model_l"], errors["ref_w"] - errors["ref_l"]
    return {"implicit_accuracy": (model_diff < ref_diff).float().mean().item(),
            "model_diff": model_diff.mean().item(), "ref_diff": ref_diff.mean().item(),
            "logit": dpo_logits(*(errors[k] for k in ("model_w", "model_l", "ref_w", "ref_l")), beta).mean().item()}


Config = DiffusionDPOConfig


def build(config: DiffusionDPOConfig, model: SDComponents, data) -> DiffusionDPO:
    """The method from its config, the Stable Diffusion components of the ``model`` group and a preference
    DataSource. With ``config.cache_path`` the DataSource's dataset is REPLACED by the encoded cache."""
    if not isinstance(model, (SDComponents, SD3Components, FluxComponents)):
        raise TypeError(f"diffusion_dpo needs model = fdistill.pipelines.SDComponents (model=sd15|sdxl|tiny_sd) or "
                        f"fdistill.flow_pipelines.SD3Components / FluxComponents (model=sd3|tiny_sd3|tiny_flux), "
                        f"got {type(model).__name__}")
    extras = data.extras or {}
    method = DiffusionDPO(config, model, tuple(data.sample_shape[-2:]), extras.get("prompts"))
    if config.cache_path:
        data.dataset = cached_dataset(method, data.dataset, config.cache_path)
    return method
