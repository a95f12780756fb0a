"""Method ``diffusion_dpo``: preference tuning of Stable Diffusion 1.5 / SDXL with Diffusion-DPO (Wallace et al.
2023, arXiv 2311.12908, Eq. 14), or the supervised baseline (SFT: denoising loss on the winners only).

The loss works in the scheduler's own space (the paper's formulation): latents z0 = vae.encode(x).sample() *
scaling_factor, one timestep t ~ U{0, ..., T-1} and one noise eps per pair shared by winner and loser,
z_t = scheduler.add_noise(z0, eps, t), and the regression target of the scheduler's ``prediction_type`` (eps, v
or z0). The reference is either a frozen copy of the UNet (full fine-tuning) or, in LoRA mode, the SAME UNet with
its adapters disabled (no second UNet in memory). Sampling (grids, evaluation) goes through
``fdistill.denoisers.DiffusersDenoiser`` and the fdistill samplers, then the VAE decoder.

Configured by ``DiffusionDPOConfig`` (``conf/method/diffusion_dpo.yaml``); built by ``build(config, model, data)``
where ``model`` is a ``fdistill.pipelines.SDComponents`` and ``data`` a preference DataSource
(``fdistill.data.preference``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..losses.dpo import diffusion_dpo_loss, dpo_logits, per_sample_mse, sft_loss
from ..pipelines import (SDComponents, build_pipeline, decode_latents, encode_latents, text_conditioning,
                         unet_conditioning)
from ..samplers.config import SamplerConfig
from .base import Method, Phase, StepContext, optimizer_checks, raise_first_failure

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
        checks = optimizer_checks(self) + [
            (self.objective in OBJECTIVES, f"method.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}"),
            (self.beta > 0, f"method.beta must be > 0, got {self.beta}"),
            (self.finetune in FINETUNE_MODES, f"method.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}"),
            (self.lora_rank >= 1, f"method.lora_rank must be >= 1, got {self.lora_rank}"),
            (self.lora_alpha > 0, f"method.lora_alpha must be > 0, got {self.lora_alpha}"),
            (len(self.lora_targets) > 0, "method.lora_targets must name at least one module"),
            (self.sdxl_micro_conditioning in MICRO_CONDITIONINGS, f"method.sdxl_micro_conditioning must be one of "
             f"{MICRO_CONDITIONINGS}, got {self.sdxl_micro_conditioning!r}"),
        ]
        raise_first_failure(checks)
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


def _target_epsilon(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return noise


def _target_v(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return scheduler.get_velocity(latents, noise, timesteps)


def _target_sample(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return latents


# scheduler prediction_type -> regression target of the UNet output
TRAINING_TARGETS = {"epsilon": _target_epsilon, "v_prediction": _target_v, "sample": _target_sample}


def sdxl_time_ids_of_batch(item: dict[str, Any], image_size: tuple[int, int]) -> Tensor:
    """[B, 6] SDXL micro-conditioning from a batch's "original_size" and "crop_top_left" ([B, 2] each) and the
    training resolution (target size); batches without them use original = target, crop = (0, 0)."""
    batch = len(item["caption"])
    target = torch.tensor(image_size, dtype=torch.float32).expand(batch, 2)
    original = item.get("original_size")
    original = target if original is None else original.float().cpu()
    crop = item.get("crop_top_left")
    crop = torch.zeros(batch, 2) if crop is None else crop.float().cpu()
    return torch.cat([original, crop, target], dim=1)


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
        self.kind = components.kind
        self.base_model = components.source
        self.tokenizers = (components.tokenizer, components.tokenizer_2)
        self.scheduler = components.scheduler
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in TRAINING_TARGETS:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} not in {sorted(TRAINING_TARGETS)}")
        self.image_size = tuple(image_size)
        self.sampler = config.sampler or SamplerConfig()
        self.prompts = list(config.prompts or prompts or ["a photo"])
        for name, module in {"vae": components.vae, **components.text_encoders()}.items():
            self.frozen[name] = module.requires_grad_(False).eval()
        unet = components.unet
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

    def _components(self) -> SDComponents:
        return SDComponents(unet=self.networks["unet"], vae=self.frozen["vae"],
                            text_encoder=self.frozen["text_encoder"], tokenizer=self.tokenizers[0],
                            scheduler=self.scheduler, text_encoder_2=self.frozen["text_encoder_2"]
                            if "text_encoder_2" in self.frozen else None, tokenizer_2=self.tokenizers[1])

    def text_conditioning(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Any]:
        """UNet keyword arguments for ``captions`` (SDXL: with pooled embeddings and ``time_ids`` [B, 6];
        default time ids: original = target = the training resolution, no crop)."""
        return text_conditioning(self._components(), captions, self.image_size, time_ids)

    def encode_latents(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f] (posterior mean, or a draw: vae_sample)."""
        return encode_latents(self.frozen["vae"], images, self.config.vae_sample)

    def encode_batch(self, item: dict[str, Any]) -> dict[str, Any]:
        """Latents of winner / loser and the UNet conditioning of a batch (raw images or a cached batch)."""
        if "latents_w" in item:
            pooled = item.get("pooled_prompt_embeds")
            cond = unet_conditioning(item["prompt_embeds"], pooled, item.get("time_ids"))
            return {"latents_w": item["latents_w"], "latents_l": item["latents_l"], "cond": cond}
        from_data = self.kind == "sdxl" and self.config.sdxl_micro_conditioning == "data"
        time_ids = sdxl_time_ids_of_batch(item, self.image_size) if from_data else None    # None: [res, res, 0, 0, res, res]
        return {"latents_w": self.encode_latents(item["x_w"]), "latents_l": self.encode_latents(item["x_l"]),
                "cond": self.text_conditioning(item["caption"], time_ids)}

    # ------------------------------------------------------------------------------------- loss

    def _errors_of(self, unet: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Any],
                   target: Tensor) -> Tensor:
        """Per-sample MSE [N] of ``unet`` on a stack of noisy latents (winners then losers)."""
        repeats = noisy.shape[0] // timesteps.shape[0]
        stacked = {k: _repeat(v, repeats) for k, v in cond.items()}
        prediction = unet(noisy, timesteps.repeat(repeats), **stacked).sample
        return per_sample_mse(prediction, target)

    def errors(self, encoded: dict[str, Any], generator: torch.Generator | None = None,
               pairs: bool | None = None) -> dict[str, Tensor]:
        """Per-pair errors of the model ('model_w', 'model_l') and the reference ('ref_w', 'ref_l'), each [B],
        at one shared timestep and noise per pair. ``pairs`` False (default for SFT): only 'model_w'.
        ``generator`` (CPU) fixes t and eps."""
        latents_w = encoded["latents_w"]
        needs_pairs = OBJECTIVES[self.config.objective][1] if pairs is None else pairs
        latents = torch.cat([latents_w, encoded["latents_l"]]) if needs_pairs else latents_w
        batch, device = latents_w.shape[0], latents_w.device
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents_w.shape, generator=generator).to(device)
        timesteps, noise = timesteps.to(device), noise.repeat(latents.shape[0] // batch, 1, 1, 1)
        stacked_t = timesteps.repeat(latents.shape[0] // batch)
        noisy = self.scheduler.add_noise(latents, noise, stacked_t)
        target = TRAINING_TARGETS[self.prediction_type](self.scheduler, latents, noise, stacked_t)
        model = self._errors_of(self.networks["unet"], noisy, timesteps, encoded["cond"], target)
        if not needs_pairs:
            return {"model_w": model}
        with torch.no_grad(), self.reference_unet() as reference:
            ref = self._errors_of(reference, noisy, timesteps, encoded["cond"], target)
        return {"model_w": model[:batch], "model_l": model[batch:], "ref_w": ref[:batch], "ref_l": ref[batch:]}

    def loss(self, phase: str, item: dict[str, Any], ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        errors = self.errors(self.encode_batch(item))
        objective = OBJECTIVES[self.config.objective][0]
        loss = objective(errors, self.config.beta).mean()
        return loss, {"loss": loss.item(), **pair_statistics(errors, self.config.beta)}

    # ------------------------------------------------------------------------------------- sampling

    def sampling_denoiser(self, unet: nn.Module) -> nn.Module:
        """``unet`` as a denoiser in sigma units (latent space), with classifier-free guidance if configured."""
        from ..denoisers import ClassifierFreeGuidance, DiffusersDenoiser

        denoiser = DiffusersDenoiser(unet, self.scheduler, null_cond=self.text_conditioning([""]))
        guidance = self.sampler.guidance
        return denoiser if guidance == 1.0 else ClassifierFreeGuidance(denoiser, guidance, denoiser.uncond)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], generator: torch.Generator | None = None,
                      reference: bool = False) -> Tensor:
        """Images [N, 3, H, W] in [-1, 1] for ``prompts`` from the tuned model (or the reference model):
        fdistill sampler in latent space, then the VAE decoder. Same generator state -> same initial noise."""
        from .. import samplers

        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(self.reference_unet()) if reference else self.networks["unet"]
            denoiser = self.sampling_denoiser(unet)
            s = self.sampler
            device = next(unet.parameters()).device
            schedule = samplers.noise_levels(s, denoiser).to(device)
            factor = 2 ** (len(self.frozen["vae"].config.block_out_channels) - 1)
            shape = (len(prompts), unet.config.in_channels, self.image_size[0] // factor, self.image_size[1] // factor)
            noise = torch.randn(shape, generator=generator).to(device) * schedule[0]
            latents = samplers.sample(denoiser, noise, schedule, solver=s.solver, cond=self.text_conditioning(prompts))
        return decode_latents(self.frozen["vae"], latents)

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
        pipeline = build_pipeline(self._components())
        if self.config.finetune == "full":
            pipeline.save_pretrained(directory)
        else:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.networks["unet"]))
            # the adapter config travels as metadata: without it Diffusers loads with alpha = rank (wrong scale)
            metadata = self.networks["unet"].peft_config["default"].to_dict()
            type(pipeline).save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                             unet_lora_adapter_metadata=metadata)
        with open(os.path.join(directory, "fdistill_dpo.json"), "w") as f:
            json.dump({"method": "diffusion_dpo", "kind": self.kind, "finetune": self.config.finetune,
                       "objective": self.config.objective, "beta": self.config.beta,
                       "base_model": self.base_model}, f, indent=2)


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


# ------------------------------------------------------------------------------------------------ evaluation

def _batches(dataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """The data set in order, collated into batch dicts (the last batch may be smaller)."""
    from torch.utils.data import DataLoader

    return iter(DataLoader(dataset, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def held_out_preference_metrics(method: DiffusionDPO, dataset, batch_size: int = 64, draws: int = 4,
                                seed: int = 0) -> dict[str, float]:
    """Implicit reward accuracy and DPO loss on held-out pairs, with FIXED timesteps / noise (``seed``) so that
    models can be compared on the same draws.

    For each pair, (model_diff - ref_diff) is averaged over ``draws`` (t, eps) draws (the implicit reward is an
    expectation over t, Eq. 14); the pair counts as correct when the average is < 0 (the tuned model lowered the
    winner's error relative to the loser's more than the reference did). At theta = ref the accuracy is 0
    (no strict ranking) and the loss log 2.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(method.networks["unet"].parameters()).device
    margins, losses = [], []
    for batch in _batches(dataset, batch_size):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        encoded = method.encode_batch(batch)
        per_draw = [method.errors(encoded, generator, pairs=True) for _ in range(draws)]
        margins.append(torch.stack([(e["model_w"] - e["model_l"]) - (e["ref_w"] - e["ref_l"]) for e in per_draw]).mean(0))
        losses.append(torch.stack([_dpo_objective(e, method.config.beta) for e in per_draw]).mean(0))
    margin, loss = torch.cat(margins), torch.cat(losses)
    return {"implicit_accuracy": (margin < 0).float().mean().item(), "dpo_loss": loss.mean().item(),
            "pairs": float(len(margin))}


Reward = Callable[[Tensor, list[str]], Tensor]


@torch.no_grad()
def sample_rewards(method: DiffusionDPO, prompts: list[str], reward: Reward | str, seed: int = 0,
                   reference: bool = False) -> tuple[Tensor, Tensor]:
    """Per-image rewards [N] of images generated for ``prompts`` (one per prompt, noise from ``seed``) by the tuned
    model or the reference, and the images [N, 3, H, W]. ``reward``: a scorer ``(images, prompts) -> [N]`` (the
    built-in preference data's rule is ``data.extras["reward"]``) or a name of ``fdistill.evaluation.rewards.SCORERS``
    ('clip', 'pickscore') loaded with its default weights."""
    if isinstance(reward, str):
        from ..evaluation.rewards import build_scorer

        reward = build_scorer(reward, device=next(method.networks["unet"].parameters()).device)
    images = method.sample_images(prompts, torch.Generator().manual_seed(seed), reference=reference)
    return reward(images, prompts).float().cpu(), images


def reward_of_samples(method: DiffusionDPO, prompts: list[str], reward: Reward | str, seed: int = 0,
                      reference: bool = False) -> tuple[float, Tensor]:
    """Mean reward of ``sample_rewards`` (same arguments); returns (mean reward, the images [N, 3, H, W])."""
    scores, images = sample_rewards(method, prompts, reward, seed, reference)
    return scores.mean().item(), images


def save_side_by_side(reference_images: Tensor, tuned_images: Tensor, path: str | Path) -> None:
    """One PNG: the reference model's samples in the top row, the tuned model's (same prompts, same noise) below."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([reference_images, tuned_images]).float().cpu()
    save_image((grid + 1) / 2, str(path), nrow=len(reference_images), padding=1)


# ------------------------------------------------------------------------------------------------ caching

@torch.no_grad()
def encode_dataset(method: DiffusionDPO, dataset, batch_size: int = 16) -> dict[str, Tensor]:
    """VAE latents of winners / losers and text conditioning of every pair, stacked ([N, ...] tensors)."""
    device = next(method.frozen["vae"].parameters()).device
    parts: dict[str, list[Tensor]] = {}
    for batch in _batches(dataset, batch_size):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        encoded = method.encode_batch(batch)
        cond = encoded["cond"]
        row = {"latents_w": encoded["latents_w"], "latents_l": encoded["latents_l"],
               "prompt_embeds": cond["encoder_hidden_states"]}
        if "added_cond_kwargs" in cond:
            row.update(pooled_prompt_embeds=cond["added_cond_kwargs"]["text_embeds"],
                       time_ids=cond["added_cond_kwargs"]["time_ids"])
        for key, value in row.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def cached_dataset(method: DiffusionDPO, dataset, path: str | Path):
    """A TensorDictDataset of encoded pairs, read from ``path`` or computed once (VAE encode once) and written there."""
    from ..data.base import TensorDictDataset

    path = Path(path)
    if path.is_file():
        try:                              # tensors only: a cache file never runs code when it is read
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"method.cache_path {path}: not a tensor cache (it holds other objects, which are not "
                             "unpickled); delete it to encode the data again") from error
    else:
        tensors = encode_dataset(method, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path)
    if len(tensors["latents_w"]) != len(dataset):
        raise ValueError(f"method.cache_path={str(path)!r} holds {len(tensors['latents_w'])} pairs but the data has "
                         f"{len(dataset)}: delete the cache or point cache_path elsewhere")
    return TensorDictDataset(**tensors)


Config = DiffusionDPOConfig


def build(config: DiffusionDPOConfig, model: SDComponents, data) -> DiffusionDPO:
    """The method from its config, the Stable Diffusion components of the ``model`` group and a preference
    DataSource. With ``config.cache_path`` the DataSource's dataset is REPLACED by the encoded cache."""
    if not isinstance(model, SDComponents):
        raise TypeError(f"diffusion_dpo needs model = fdistill.pipelines.SDComponents (model=sd15|sdxl|tiny_sd), "
                        f"got {type(model).__name__}")
    extras = data.extras or {}
    method = DiffusionDPO(config, model, tuple(data.sample_shape[-2:]), extras.get("prompts"))
    if config.cache_path:
        data.dataset = cached_dataset(method, data.dataset, config.cache_path)
    return method
