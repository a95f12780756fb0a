"""f-distill of Stable Diffusion 1.5 / SDXL into a one-step text-to-image generator (Xu, Nie & Vahdat 2025, the
text-to-image experiments; DMD2 (Yin et al. 2024) with ``divergence=rkl``).

The method is ``FDistill`` with a ``TextToImageDomain``: it works in the VAE's latent space and conditions on prompts:
- teacher: the pipeline's UNet as a ``DiffusersDenoiser`` (in ``model.torch_dtype`` when one is set), with the
  encoded empty prompt as its null condition: classifier-free guidance (``method.guidance_scale``) on the teacher
  only; student and fake score are float32 copies of the UNet and see the conditional pass.
- condition of a batch: the UNet conditioning of its ``"caption"`` list (SDXL: pooled embeddings and time ids with
  original size = target size = the model's resolution).
- real samples of the discriminator: VAE latents (posterior mean) of the batch's ``"x"`` images. Prompt-only data
  has none: then only distribution matching without a discriminator runs (``divergence=rkl``, ``gan_weight=0``).
- generator: x = D_student(sqrt(1 + sigma_g^2) z, sigma_g) with sigma_g the teacher's largest sigma (t = T - 1) by
  default. In the UNet's VP units its input is x_T = z, the pure noise Diffusers pipelines start from, so the
  exported pipeline (one DDIM step at t = T - 1, ``fdistill.export_schedulers.one_step_scheduler``) generates the same
  latents from the same noise. A few-step student (``method.generator_sigmas``, noise levels of integer timesteps,
  e.g. DMD2's t = 999, 749, 499, 249 of the SD schedule: [14.61465, 4.08173, 1.61289, 0.69321]) exports with an
  LCM scheduler that runs the same chain (``fdistill.export_schedulers.few_step_scheduler``).
- SD3 / Flux (rectified flow, ``fdistill.flow_pipelines``): the same with the transformer; the student's input
  (1 + sigma_g) z is the pipeline's x_t = z, and the export is a ``FlowMatchEulerDiscreteScheduler`` run at the generator's times.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ...denoisers import DiffusersDenoiser
from ...denoisers.io import save_denoiser
from ...latent_component import LatentDiffusionComponent, latent_component
from ...export_schedulers import integer_timesteps
from ...pipelines import SDComponents
from .config import FDistillConfig
from .method import FDistill


class TextToImageDomain:
    """Stable Diffusion latents conditioned on prompts (see the module docstring). It holds the latent component
    (``fdistill.latent_component``) that Diffusion-DPO holds too; built by ``build_text_to_image``.

    Args:
        sd: the latent component (its VAE and text encoders become frozen members of the method).
        schedule: the UNet's DDPM schedule in sigma units (``DiffusersDenoiser.schedule``).
        sample_shape: [C, h, w] of one latent.
        prompts: prompts of ``generate`` when no condition is given (cycled).
    """

    num_classes = 0

    def __init__(self, sd: LatentDiffusionComponent, schedule: Any, sample_shape: tuple[int, ...],
                 prompts: list[str]):
        self.sd = sd
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.prompts = list(prompts)
        self.input_scaling = sd.input_scaling

    @property
    def kind(self) -> str:
        return self.sd.kind

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.sd.frozen_modules()

    def default_generator_sigma(self, config: FDistillConfig, teacher: nn.Module) -> float:
        """The teacher's largest sigma (t = T - 1): the student's VP input is then the pipelines' x_T = z."""
        return teacher.sigma_max

    def condition_of(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """UNet conditioning of the batch's captions."""
        return self.sd.conditioning(batch["caption"])

    def real_samples(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """Latents [B, C, h, w] of the batch's images (posterior mean), None for prompt-only batches."""
        return self.sd.encode(batch["x"].to(device)) if "x" in batch else None

    def generation_condition(self, num: int, cond: Any, device: torch.device) -> dict[str, Any]:
        """UNet conditioning of the prompts ``cond`` (list of str), by default the configured prompts in turn."""
        prompts = list(cond) if cond is not None else [self.prompts[i % len(self.prompts)] for i in range(num)]
        return self.sd.conditioning(prompts[:num])

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1]."""
        return self.sd.decode(latents)

    def timesteps(self, sigmas: tuple[float, ...]) -> list[int]:
        """The integer UNet timesteps of the generator's noise levels (t = T - 1 for the default one step)."""
        return integer_timesteps(self.schedule, sigmas)

    def export(self, student: DiffusersDenoiser, directory: str, generator_sigmas: tuple[float, ...],
               noise_scale: float) -> None:
        """Save the student as a Diffusers pipeline plus fdistill.json (kind generator). One step:
        ``StableDiffusionPipeline.from_pretrained(directory)(prompt, num_inference_steps=1, guidance_scale=1.0)``
        (SDXL: ``StableDiffusionXLPipeline``; a DDIM scheduler). Few steps: an LCM scheduler, called with
        ``timesteps=<fdistill.json "diffusers_timesteps">``. SD3 / Flux: ``FlowMatchEulerDiscreteScheduler`` called
        with ``sigmas=<fdistill.json "diffusers_sigmas">`` (``fdistill.flow_pipelines``). ``fdistill sample --model
        directory --prompt ...`` runs SD and SD3. Guidance is distilled into the student: sample it without CFG."""
        scheduler, fields = self.sd.generator_export(generator_sigmas)
        save_denoiser(student, directory, kind="generator", generator_sigmas=generator_sigmas,
                      generator_noise_scale=noise_scale, pipeline=self.sd.pipeline(student.net, scheduler),
                      extra_info=fields)


def check_text_to_image_data(config: FDistillConfig, data: Any, image_size: tuple[int, int]) -> None:
    """Captioned data whose images (if any) have the model's resolution; prompt-only data only without a
    discriminator. Raises ValueError naming the setting to change."""
    if data is None or not hasattr(data, "dataset"):
        raise ValueError("text-to-image f-distill needs a data source with captions: data=captioned_shapes, "
                         "data=prompt_file, or data=hf_images with data.caption_column")
    shape = tuple(getattr(data, "sample_shape", ()) or ())
    if not shape:
        if config.divergence != "rkl" or config.gan_weight > 0:
            raise ValueError(f"data {data.name!r} has prompts but no images: method.divergence={config.divergence} / "
                             f"method.gan_weight={config.gan_weight} need real images for the discriminator. Use "
                             "captioned images (data=hf_images with data.caption_column, data=captioned_shapes), or "
                             "method.divergence=rkl method.gan_weight=0 (distribution matching only)")
        return
    if tuple(shape[-2:]) != tuple(image_size) or shape[0] != 3:
        raise ValueError(f"data {data.name!r} gives images of shape {list(shape)} but the model generates "
                         f"[3, {image_size[0]}, {image_size[1]}]: set data.resolution={image_size[0]}")


def default_prompts(config: FDistillConfig, data: Any) -> list[str]:
    """Sample-grid prompts: ``method.prompts``, else the data's ``extras["prompts"]``, else its first captions."""
    if config.prompts:
        return list(config.prompts)
    extras = getattr(data, "extras", None) or {}
    if extras.get("prompts"):
        return list(extras["prompts"])
    captions = getattr(getattr(data, "dataset", None), "captions", None) or []
    return list(dict.fromkeys(captions))[:16] or ["a photo"]


def build_text_to_image(config: FDistillConfig, components: SDComponents, data: Any) -> FDistill:
    """The method for Stable Diffusion ``components`` (``fdistill.pipelines``) and captioned / prompt data."""
    image_size = components.image_size        # (H, W) in pixels of the images the latents decode to
    check_text_to_image_data(config, data, image_size)
    sd = latent_component(components, image_size)
    null_cond = sd.conditioning([""])
    unet = components.unet
    student_net, fake_net = copy.deepcopy(unet).float(), copy.deepcopy(unet).float()
    if config.gradient_checkpointing:
        for net in (student_net, fake_net):
            net.enable_gradient_checkpointing()
    frozen_dtype = components.vae.dtype
    shift, side = sd.schedule_shift(), sd.latent_shape(1)[-1]      # the trained size (Flux's config has none)
    teacher = DiffusersDenoiser(unet, components.scheduler, null_cond=null_cond, mu=shift, sample_size=side,
                                dtype=None if frozen_dtype == torch.float32 else frozen_dtype)
    student, fake_score = (DiffusersDenoiser(net, components.scheduler, null_cond=null_cond, mu=shift, sample_size=side)
                           for net in (student_net, fake_net))
    domain = TextToImageDomain(sd, teacher.schedule, sd.latent_shape(1)[1:], default_prompts(config, data))
    method = FDistill(config, teacher, student, fake_score, domain)
    sd.generator_export(method.generator_sigmas)  # fail at start-up, not at export, on sigmas the pipeline can't take
    return method
