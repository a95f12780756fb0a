"""Diffusion-DPO's step in plain PyTorch / Diffusers calls: the floor the trainer's time per step is compared with."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor


class BareDPOLoop:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14) in plain PyTorch / Diffusers calls on a ``DiffusionDPO`` method's
    own networks: the network evaluations of one trainer step (VAE encoder on winners and losers, text encoder,
    trained UNet on both, reference UNet on both without grad), its backward pass, gradient clipping and AdamW
    step, without the package's method and trainer layers. Its time per step is the floor the trainer's is compared
    with (SD1.5 layout: no SDXL added conditioning)."""

    def __init__(self, method, autocast_dtype: torch.dtype | None, device: torch.device):
        config = method.config
        self.method, self.device, self.autocast_dtype = method, device, autocast_dtype
        self.unet = method.networks["unet"]
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)

    def _reference_sample(self, noisy: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        if "reference" in self.method.frozen:
            return self.method.frozen["reference"](noisy, timesteps, encoder_hidden_states=embeds).sample
        self.unet.disable_adapters()
        try:
            return self.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        finally:
            self.unet.enable_adapters()

    def step(self, batch: dict[str, Any]) -> float:
        vae, text_encoder = self.method.frozen["vae"], self.method.frozen["text_encoder"]
        tokenizer, scheduler, beta = self.method.sd.parts.tokenizer, self.method.sd.scheduler, self.method.config.beta
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else nullcontext())
        with autocast:
            with torch.no_grad():
                images = torch.cat([batch["x_w"], batch["x_l"]]).to(self.device, vae.dtype)
                latents = vae.encode(images).latent_dist.mode().float() * vae.config.scaling_factor
                ids = tokenizer(list(batch["caption"]), padding="max_length", truncation=True,
                                max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
                embeds = text_encoder(ids.to(self.device))[0].repeat(2, 1, 1)
            pairs = latents.shape[0] // 2
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=self.device).repeat(2)
            noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            model_error = (self.unet(noisy, timesteps, encoder_hidden_states=embeds).sample.float() - noise)
            with torch.no_grad():
                reference_error = self._reference_sample(noisy, timesteps, embeds).float() - noise
        model_mse, reference_mse = (e.pow(2).mean(dim=(1, 2, 3)) for e in (model_error, reference_error))
        margin = (model_mse[:pairs] - model_mse[pairs:]) - (reference_mse[:pairs] - reference_mse[pairs:])
        loss = -torch.nn.functional.logsigmoid(-0.5 * beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.method.config.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
