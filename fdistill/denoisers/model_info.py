"""``ModelInfo``: what a model directory says about its model (``fdistill.denoisers.io.load_denoiser`` returns it
with the denoiser; the fields mirror fdistill.json, see ``fdistill.denoisers.io``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import EDM_SIGMA_MAX, EDM_SIGMA_MIN


@dataclass
class ModelInfo:
    """What a model directory says about its model.

    Attributes:
        kind: "denoiser" (multi-step sampling) or "generator" (one step: x = D(c * z, generator_sigma)).
        generator_sigma: noise level of a generator's input (None for denoisers).
        generator_sigmas: a few-step generator's noise levels sigma_1 > ... > sigma_K (sigma_1 = generator_sigma):
            x_1 = c z, x_{k+1} = D(x_k, sigma_k) + sigma_{k+1} eps_k, output D(x_K, sigma_K); None = one step.
        generator_noise_scale: c, the scale of the generator's input noise z ~ N(0, I); None = generator_sigma.
            Generators distilled from a discrete VP model use sqrt(1 + sigma^2), the "pure noise" input x_t = z of
            Diffusers pipelines (one-step DDIM at t = T - 1).
        sample_shape: shape of one sample (C, H, W) or (dim,) (latents for latent-diffusion pipelines).
        num_classes: real classes of a class-conditional model (the null class index), else None.
        conditioning: "none", "class" (labels [B]) or "text" (encoder_hidden_states).
        sigma_min, sigma_max: noise range of the model.
        wrapper: "edm", "vp", "flow" (rectified flow: SD3, Flux) or "edm_network" (fdistill.edm networks).
        source: the path or hub id it was loaded from.
        base_model: a LoRA export's base pipeline (path or hub id) the LoRA was fused into; None otherwise.
        components: other pipeline parts by name -> (path or hub id, subfolder), e.g. {"vae": ("sd-dir", "vae")},
            loadable with ``<Class>.from_pretrained(root, subfolder=subfolder)``.
    """

    kind: str = "denoiser"
    generator_sigma: float | None = None
    generator_sigmas: tuple[float, ...] | None = None
    generator_noise_scale: float | None = None
    sample_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    conditioning: str = "none"
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    wrapper: str = "edm"
    source: str = ""
    base_model: str | None = None
    components: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def generator_input_scale(self) -> float:
        """c of a generator's input c * z (``generator_noise_scale``, else ``generator_sigma``)."""
        return self.generator_noise_scale or self.generator_sigma

    @property
    def generator_chain(self) -> tuple[float, ...]:
        """A generator's noise levels, one per step (``generator_sigmas``, else (generator_sigma,))."""
        return tuple(self.generator_sigmas or (self.generator_sigma,))
