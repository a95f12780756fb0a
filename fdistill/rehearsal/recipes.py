"""The rehearsal rows (one per paper recipe and variant) and how a recipe is shrunk to run offline: its model group
replaced by the same architecture built from config, its data by built-in data of the recipe's shape, its batch,
steps and DDO rounds made small."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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


def _image_rows(dataset: str, architecture: str, shape: tuple[int, ...], num_classes: int,
                ddo_architecture: str | None = None) -> list[Rehearsal]:
    return [Rehearsal(f"{dataset}_fdistill", f"{dataset}_fdistill", architecture, "images", shape, num_classes,
                      trained_copies=2),
            Rehearsal(f"{dataset}_ddo", f"{dataset}_ddo", ddo_architecture or architecture, "images", shape,
                      num_classes)]


REHEARSALS: dict[str, Rehearsal] = {row.name: row for row in [
    *_image_rows("cifar10", "edm-cifar10-32x32-cond-vp", (3, 32, 32), 10),          # the papers' teachers
    *_image_rows("imagenet64", "edm-imagenet-64x64-cond-adm", (3, 64, 64), 1000, ddo_architecture="edm2-img64-s"),
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


def random_images(shape: list[int], num_classes: int = 0, num: int = 16, seed: int = 0):
    """A DataSource of ``num`` random images [C, H, W] in [-1, 1] (with random labels when ``num_classes``): the
    shape of a recipe's data set without its files."""
    from ..data.base import DataSource, TensorDictDataset

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

    from ..config import compose

    spec = compose([f"experiment={row.experiment}",
                    *shrink_overrides(row, steps, batch, device, run_dir, compile_networks)])
    cfg = spec.cfg      # the model and data groups are not part of the validated sections
    recipe_model = OmegaConf.to_container(cfg.model) if cfg.get("model") else {}
    with open_dict(cfg):
        cfg.model = model_group(row, recipe_model, resolution, frozen_dtype)
        cfg.data = data_group(row, resolution, num=max(batch * steps, 8))
    return spec
