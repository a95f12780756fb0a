"""Real-size rehearsal of the paper recipes: each recipe's real networks (published configs, random weights, no
download: ``fdistill.architectures``) trained for a few steps by the package's own code path, with the memory that
takes next to its analytic minimum.

One rehearsal composes ``experiment=<recipe>`` (``fdistill.config.compose``), replaces only what cannot run offline
or at full size — the ``model`` group by the same architecture built from config, the ``data`` group by built-in
data of the recipe's shape at a small resolution, the batch by 1-2 samples on one process, DDO's fake pool and
rounds by a small pool and one round — builds the run with ``fdistill.config.build_run`` (the method's own
``build``) and runs ``Trainer.train_step`` (the trainer's whole step: micro-batches, autocast, backward, clipping,
optimizer, EMA) on steps chosen so that every phase of the method runs.

Analytic minimum (bytes) = weights + optimizer states of the trained parameters + gradients of the largest phase +
EMA copies + frozen weights and buffers (everything else the method holds); activations come on top. Optimizer
states: AdamW / Adam two moments of the parameter's size; Adafactor (no first moment) one row and one column factor
per matrix, a full second moment for vectors. Peak memory: on CPU the peak resident set size of the training steps
(VmHWM, reset through /proc/self/clear_refs before the first step) minus the resident size of the interpreter with
torch and the libraries imported (``runtime_gib``: not the run's memory); on GPU ``torch.cuda.max_memory_allocated``
over the steps. Each rehearsal runs in its own process (``rehearse_in_subprocess``) so one recipe's peak does not
hide another's.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

GIB = 2 ** 30


@dataclass(frozen=True)
class Rehearsal:
    """One row of the rehearsal: a recipe (``conf/experiment/<experiment>.yaml``) at real size.

    Attributes:
        name: row name (the recipe, plus the variant: ``sd15_dpo_lora`` is ``dpo_sd15`` with method.finetune=lora).
        experiment: the recipe.
        architecture: "sd15" / "sdxl" / "sd3" / "flux" (``COMPONENT_BUILDERS``) or a key of ``DENOISER_ARCHITECTURES``.
        data: the data group that replaces the recipe's: ``"images"`` (random images of ``image_shape``),
            ``"captioned"`` (built-in captioned shapes) or ``"pairs"`` (built-in preference pairs).
        image_shape: [C, H, W] of "images" data (the recipe's data shape).
        num_classes: classes of "images" data.
        overrides: Hydra overrides of the variant (after the recipe).
        trained_copies, frozen_copies: copies of the main network (UNet / denoiser) the method trains and keeps
            frozen (f-distill: student + fake score, teacher; DDO: target, reference; DPO full: UNet, reference;
            DPO LoRA: adapters only, the UNet) - for the estimate that decides, before building, whether it fits.
    """

    name: str
    experiment: str
    architecture: str
    data: str
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0
    overrides: tuple[str, ...] = ()
    trained_copies: int = 1
    frozen_copies: int = 1


def _sd_rows(kind: str) -> list[Rehearsal]:
    return [Rehearsal(f"{kind}_fdistill", f"{kind}_fdistill", kind, "captioned", trained_copies=2),
            Rehearsal(f"{kind}_dpo_lora", f"dpo_{kind}", kind, "pairs", overrides=("method.finetune=lora",),
                      trained_copies=0),
            Rehearsal(f"{kind}_dpo_full", f"dpo_{kind}", kind, "pairs", overrides=("method.finetune=full",))]


def _image_rows(dataset: str, architecture: str, shape: tuple[int, ...], num_classes: int) -> list[Rehearsal]:
    return [Rehearsal(f"{dataset}_fdistill", f"{dataset}_fdistill", architecture, "images", shape, num_classes,
                      trained_copies=2),
            Rehearsal(f"{dataset}_ddo", f"{dataset}_ddo", architecture, "images", shape, num_classes)]


REHEARSALS: dict[str, Rehearsal] = {row.name: row for row in [
    *_image_rows("cifar10", "ddpm-cifar10-32", (3, 32, 32), 10),
    *_image_rows("imagenet64", "imagenet64-unet", (3, 64, 64), 1000),
    # the ImageNet recipes also take a DiT ("a Diffusers UNet / DiT"): DiT-XL/2-256 on its 32x32x4 latents
    Rehearsal("imagenet_dit_xl2_ddo", "imagenet64_ddo", "dit-xl-2-256", "images", (4, 32, 32), 1000),
    *_sd_rows("sd15"),
    *_sd_rows("sdxl"),
    # flow-matching transformers: SD3 medium (2.0 B) and FLUX.1-dev (11.9 B), each with T5-XXL (4.8 B) frozen
    Rehearsal("sd3_fdistill", "sd3_fdistill", "sd3", "captioned", trained_copies=2),
    Rehearsal("sd3_dpo_lora", "sd3_dpo", "sd3", "pairs", overrides=("method.finetune=lora",), trained_copies=0),
    Rehearsal("sd3_dpo_full", "sd3_dpo", "sd3", "pairs", overrides=("method.finetune=full",)),
    Rehearsal("flux_fdistill", "flux_fdistill", "flux", "captioned", trained_copies=2),
]}

# latent text-to-image architectures -> their builder in fdistill.architectures (the others: denoiser_from_config)
COMPONENT_BUILDERS = {"sd15": "sd_components_from_config", "sdxl": "sd_components_from_config",
                      "sd3": "flow_components_from_config", "flux": "flow_components_from_config"}


# ----------------------------------------------------------------------------------------------- data and model

def random_images(shape: list[int], num_classes: int = 0, num: int = 16, seed: int = 0):
    """A DataSource of ``num`` random images [C, H, W] in [-1, 1] (with random labels when ``num_classes``): the
    shape of a recipe's data set without its files."""
    from .data.base import DataSource, TensorDictDataset

    generator = torch.Generator().manual_seed(seed)
    tensors = {"x": torch.rand(num, *shape, generator=generator) * 2 - 1}
    if num_classes:
        tensors["label"] = torch.randint(num_classes, (num,), generator=generator)
    return DataSource(TensorDictDataset(**tensors), tuple(shape), num_classes, name="random-images")


def data_group(row: Rehearsal, resolution: int, num: int) -> dict[str, Any]:
    """The data group of a rehearsal (``num`` items; SD data at ``resolution`` px)."""
    if row.data == "images":
        return {"_target_": f"{__name__}.random_images", "shape": list(row.image_shape),
                "num_classes": row.num_classes, "num": num}
    if row.data == "captioned":
        return {"_target_": "fdistill.data.captioned_shapes", "num_images": num, "resolution": resolution}
    return {"_target_": "fdistill.data.preference.shape_preferences", "num_pairs": num, "resolution": resolution}


def model_group(row: Rehearsal, recipe_model: dict[str, Any], resolution: int,
                frozen_dtype: str | None = None) -> dict[str, Any]:
    """The model group of a rehearsal: the recipe's architecture from config; SD keeps the recipe's
    ``torch_dtype`` of the frozen parts unless ``frozen_dtype`` replaces it."""
    if row.architecture in COMPONENT_BUILDERS:
        return {"_target_": f"fdistill.architectures.{COMPONENT_BUILDERS[row.architecture]}", "kind": row.architecture,
                "torch_dtype": frozen_dtype or recipe_model.get("torch_dtype"), "latent_size": resolution // 8}
    return {"_target_": "fdistill.architectures.denoiser_from_config", "architecture": row.architecture}


def shrink_overrides(row: Rehearsal, steps: int, batch: int, device: str, run_dir: str,
                     compile_networks: bool) -> list[str]:
    """Hydra overrides that make the recipe fit a rehearsal: one process, ``batch`` samples, ``steps`` steps, no
    files; DDO: one round with a pool of one batch of fakes drawn with a 2-step sampler."""
    overrides = [f"train.steps={steps}", f"train.batch_size={batch}", "train.micro_batches=1",
                 f"train.device={device}", f"train.run_dir={run_dir}", "train.progress=false", "train.export=false",
                 f"train.compile={str(compile_networks).lower()}"]
    if row.experiment.endswith("_ddo"):
        overrides += ["method.rounds=1", f"method.steps_per_round={steps}", f"method.fake_pool_size={batch}",
                      f"method.generation_batch={batch}", "method.sampler.steps=2", "method.eval_every=0"]
    return overrides + list(row.overrides)


def compose_rehearsal(row: Rehearsal, steps: int, batch: int, device: str, resolution: int, run_dir: str,
                      compile_networks: bool = False, frozen_dtype: str | None = None):
    """The validated RunSpec of a rehearsal: the recipe with its model and data groups replaced and shrunk."""
    from omegaconf import OmegaConf, open_dict

    from .config import compose, validate

    cfg = compose([f"experiment={row.experiment}",
                   *shrink_overrides(row, steps, batch, device, run_dir, compile_networks)])
    recipe_model = OmegaConf.to_container(cfg.model) if cfg.get("model") else {}
    with open_dict(cfg):
        cfg.model = model_group(row, recipe_model, resolution, frozen_dtype)
        cfg.data = data_group(row, resolution, num=max(batch * steps, 8))
    return validate(cfg)


# ----------------------------------------------------------------------------------------------- memory

def tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(param: Tensor, optimizer: str) -> int:
    """Bytes of one parameter's optimizer state: Adam(W) two moments; Adafactor without first moment (the
    trainer's setting) a row and a column factor of a matrix (leading dimensions folded into the rows), a full
    second moment of a vector."""
    if optimizer != "adafactor":
        return 2 * tensor_bytes(param)
    if param.ndim < 2:
        return tensor_bytes(param)
    rows, columns = math.prod(param.shape[:-1]), math.prod(param.shape[:-2]) * param.shape[-1]
    return (rows + columns) * param.element_size()


@dataclass
class AnalyticMemory:
    """The least memory a training step can hold, in bytes (activations not included)."""

    trained_weights: int
    gradients: int
    optimizer_states: int
    ema: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trained_weights + self.gradients + self.optimizer_states + self.ema + self.frozen


def trained_parameters(trainer) -> dict[int, tuple[Tensor, str]]:
    """Every parameter some phase trains (once, however many phases train it) with its phase's optimizer."""
    trained: dict[int, tuple[Tensor, str]] = {}
    for name, phase in trainer.phases.items():
        for param in trainer.params[name]:
            trained.setdefault(id(param), (param, phase.optimizer))
    return trained


def analytic_memory(trainer) -> AnalyticMemory:
    """Weights and optimizer states of the trained parameters, the gradients of the largest phase (the trainer
    frees a phase's gradients after its step: f-distill never holds the student's and the critic's at once), EMA
    snapshots, and every other parameter and buffer of the method (frozen networks, LoRA base weights, statistics)."""
    trained = trained_parameters(trainer)
    weights = sum(tensor_bytes(p) for p, _ in trained.values())
    others = [t for t in [*trainer.method.parameters(), *trainer.method.buffers()] if id(t) not in trained]
    largest_phase = max(sum(tensor_bytes(p) for p in params) for params in trainer.params.values())
    return AnalyticMemory(
        trained_weights=weights, gradients=largest_phase,
        optimizer_states=sum(optimizer_state_bytes(p, kind) for p, kind in trained.values()),
        ema=sum(tensor_bytes(t) for snapshot in trainer.ema.snapshots.values() for t in snapshot.values()),
        frozen=sum(tensor_bytes(t) for t in others))


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def resident_gib() -> float:
    """This process's resident set size now (GiB)."""
    return _status_kib("VmRSS") / 2 ** 20


class PeakMemory:
    """Peak memory of a stretch of code on ``device``: the resident set's high-water mark on CPU (Linux: reset by
    writing 5 to /proc/self/clear_refs), ``torch.cuda.max_memory_allocated`` on GPU. GiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed build-time heap (fp32 copies cast away) leaves the RSS
            Path("/proc/self/clear_refs").write_text("5")

    def current_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / GIB
        return resident_gib()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return _status_kib("VmHWM") / 2 ** 20


# ----------------------------------------------------------------------------------------------- steps

def step_window(method, steps: int, search: int = 64) -> list[int]:
    """``steps`` consecutive step indices, the earliest window that runs the most distinct phases (f-distill with
    a student every 5th step and 3 steps: [2, 3, 4] = critic, critic, student)."""
    def distinct(start: int) -> int:
        return len({method.phase_at(start + k) for k in range(steps)})

    start = max(range(search), key=lambda s: (distinct(s), -s))
    return list(range(start, start + steps))


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``; CPU seconds hardly depend on other processes
    sharing the cores, wall seconds do."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def import_libraries() -> None:
    """Load the model classes the rehearsals use (Diffusers and transformers load them lazily), so the resident
    size measured before building counts the libraries' code and not the run's memory."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import (AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel,  # noqa: F401
                           UNet2DModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from . import config, training  # noqa: F401


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


# ----------------------------------------------------------------------------------------------- one rehearsal

@dataclass
class RehearsalResult:
    """One row of the table (memory in GiB, times in seconds; ``ratio`` = (peak - runtime) / analytic).
    ``resident_before_gib``: memory when the steps start (weights built, no optimizer state yet).
    ``trainer_over_bare``: throughput of the trainer relative to the bare loop (bare seconds / trainer seconds,
    CPU seconds on CPU)."""

    name: str
    experiment: str
    architecture: str
    device: str
    status: str = "ok"
    batch: int = 0
    resolution: int = 0
    steps: list[int] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    mixed_precision: str = "no"
    frozen_dtype: str | None = None
    compile: bool = False
    trained_params: int = 0
    frozen_params: int = 0
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    seconds_per_step: float = math.nan
    cpu_seconds_per_step: float = math.nan
    resident_before_gib: float = math.nan
    peak_gib: float = math.nan
    runtime_gib: float = 0.0
    analytic: dict[str, float] = field(default_factory=dict)
    analytic_gib: float = math.nan
    ratio: float = math.nan
    bare_step_seconds: list[float] = field(default_factory=list)
    bare_step_cpu_seconds: list[float] = field(default_factory=list)
    trainer_over_bare: float = math.nan
    losses: list[float] = field(default_factory=list)


def steady_seconds(times: list[float]) -> float:
    """Median time of the steps after the first (which allocates optimizer states and, in DDO, draws the fakes)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def rehearse(row: Rehearsal, steps: int = 3, batch: int = 2, device: str = "cpu", resolution: int = 64,
             compile_networks: bool = False, bare: bool = False, frozen_dtype: str | None = None) -> RehearsalResult:
    """Build ``row`` at real size and run ``steps`` trainer steps (interleaved with as many bare-loop steps when
    ``bare``, a DPO row only); see the module docstring for what is measured. ``frozen_dtype`` replaces the
    recipe's dtype of the frozen SD parts (the recipes' float16 fails on CPU: see benchmarks/rehearsal_cpu.md)."""
    from .config import build_run
    from .training import Trainer

    torch_device = torch.device(device)
    import_libraries()
    gc.collect()
    runtime = resident_gib() if torch_device.type == "cpu" else 0.0
    result = RehearsalResult(row.name, row.experiment, row.architecture, device, batch=batch, resolution=resolution,
                             compile=compile_networks, runtime_gib=runtime)
    with tempfile.TemporaryDirectory() as run_dir:
        spec = compose_rehearsal(row, steps, batch, device, resolution, run_dir, compile_networks, frozen_dtype)
        run = build_run(spec, with_loggers=False)
        trainer = Trainer(run.method, run.data, spec.train)
        window = step_window(run.method, steps)
        batches = run.data.loader(spec.train.batch_size, seed=spec.train.seed, start_step=window[0])
        bare_loop = BareDPOLoop(run.method, dict(bf16=torch.bfloat16, fp16=torch.float16).get(
            spec.train.mixed_precision), torch_device) if bare else None
        run.method.train()                      # as Trainer.fit does before its loop
        memory = PeakMemory(torch_device)
        memory.reset()
        result.resident_before_gib = memory.current_gib()
        for index, step in enumerate(window):
            item = next(batches)
            logs: dict[str, float] = {}
            runs = [(lambda: logs.update(trainer.train_step(step, item)), result.step_seconds, result.step_cpu_seconds)]
            if bare_loop is not None:   # alternate which goes first: neither always runs on a warmer cache
                runs.insert(index % 2, (lambda: bare_loop.step(item), result.bare_step_seconds,
                                        result.bare_step_cpu_seconds))
            for fn, wall_times, cpu_times in runs:
                wall, cpu = _timed(fn, torch_device)
                wall_times.append(wall)
                cpu_times.append(cpu)
            result.losses.append(logs["loss"])
        result.peak_gib = memory.peak_gib()
        analytic = analytic_memory(trainer)
        trained = trained_parameters(trainer)
        result.steps, result.phases = window, [run.method.phase_at(s) for s in window]
        result.mixed_precision = spec.train.mixed_precision
        result.frozen_dtype = spec.cfg.model.get("torch_dtype")
        result.trained_params = sum(p.numel() for p, _ in trained.values())
        result.frozen_params = sum(p.numel() for p in run.method.parameters() if id(p) not in trained)
    result.analytic = {k: v / GIB for k, v in asdict(analytic).items()}
    result.analytic_gib = analytic.total / GIB
    result.seconds_per_step = steady_seconds(result.step_seconds)
    result.cpu_seconds_per_step = steady_seconds(result.step_cpu_seconds)
    result.ratio = (result.peak_gib - runtime) / result.analytic_gib
    if bare:
        on_cpu = torch_device.type == "cpu"
        bare_times = result.bare_step_cpu_seconds if on_cpu else result.bare_step_seconds
        trainer_times = result.step_cpu_seconds if on_cpu else result.step_seconds
        result.trainer_over_bare = steady_seconds(bare_times) / steady_seconds(trainer_times)
    return result


def estimate_gib(row: Rehearsal, resolution: int = 64, frozen_dtype: str | None = None) -> float:
    """The analytic minimum estimated before building anything: the recipe's networks built on the meta device
    (no memory), counted as ``trained_copies`` trained (fp32 weights, gradients, optimizer states, EMA copies) and
    ``frozen_copies`` frozen copies of the main network, plus the other components in their dtype."""
    from hydra.utils import instantiate

    from .architectures import network_from_config

    spec = compose_rehearsal(row, 1, 1, "cpu", resolution, "unused", frozen_dtype=frozen_dtype)
    with torch.device("meta"):
        model = (instantiate(spec.cfg.model, _convert_="all") if row.architecture in COMPONENT_BUILDERS
                 else network_from_config(row.architecture))
    main = getattr(model, "unet", model)
    others = [module for module in vars(model).values() if isinstance(module, nn.Module) and module is not main]
    main_params = sum(p.numel() for p in main.parameters())
    optimizer = getattr(spec.method_config, "optimizer", "adamw")
    per_trained = 4 + 4 + (8 if optimizer != "adafactor" else 0) + 4 * len(spec.train.ema_decays)
    other_bytes = sum(tensor_bytes(p) for module in others for p in module.parameters())
    return (main_params * (row.trained_copies * per_trained + row.frozen_copies * 4) + other_bytes) / GIB


def rehearse_in_subprocess(row: Rehearsal, timeout: float | None = None, **options) -> RehearsalResult:
    """``rehearse`` in a fresh interpreter (``python -m fdistill.rehearsal``): a peak of its own; a failure becomes
    the row's status (its last error line)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "result.json"
        command = [sys.executable, "-m", __name__, row.name, "--json", str(path)]
        for key, value in options.items():
            if value is True:
                command.append(f"--{key.replace('_', '-')}")
            elif value is not False:
                command += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 and path.is_file():
            return RehearsalResult(**json.loads(path.read_text()))
    error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return RehearsalResult(row.name, row.experiment, row.architecture, options.get("device", "cpu"),
                           status=f"failed: {error}")


# ----------------------------------------------------------------------------------------------- table

def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def format_table(results: list[RehearsalResult]) -> str:
    """A markdown table of rehearsal rows (memory in GiB; seconds per step after the first step)."""
    lines = ["| recipe | trained params | frozen params | s/step wall | s/step CPU | peak | runtime | analytic trained "
             "(weights + grads + opt + EMA) | analytic frozen | analytic total | (peak - runtime) / analytic | "
             "trainer/bare | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        trained = sum(r.analytic.get(k, 0.0) for k in ("trained_weights", "gradients", "optimizer_states", "ema"))
        cells = [r.name + (" (compiled)" if r.compile else ""), f"{r.trained_params:,}", f"{r.frozen_params:,}",
                 _number(r.seconds_per_step),
                 _number(r.cpu_seconds_per_step), _number(r.peak_gib), _number(r.runtime_gib),
                 _number(trained if r.analytic else math.nan), _number(r.analytic.get("frozen", math.nan)),
                 _number(r.analytic_gib), _number(r.ratio), _number(r.trainer_over_bare), r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill.rehearsal", description="one rehearsal row as JSON")
    parser.add_argument("name", choices=sorted(REHEARSALS))
    parser.add_argument("--json", required=True, help="where to write the row")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--compile-networks", action="store_true")
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--frozen-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    result = rehearse(REHEARSALS[args.name], args.steps, args.batch, args.device, args.resolution,
                      args.compile_networks, args.bare, args.frozen_dtype)
    Path(args.json).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
