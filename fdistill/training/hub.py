"""Sharing an export (``run_dir/model``): its model card and its upload to the Hugging Face Hub.

The card is the ``README.md`` the Hub shows: YAML front matter (``library_name: diffusers``, tags, ``base_model``
and ``license`` when known) and a body with the method, the base model, the divergence and student steps of an
f-distill generator, the key hyper-parameters, the last evaluation's metrics and the command that made the run,
plus the run's full resolved config. It is built from what the run directory holds (``config.yaml``,
``metrics.jsonl``) and what the export itself says (``fdistill.json``, ``fdistill_dpo.json``).
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

CARD_FILENAME = "README.md"

METHOD_DESCRIPTIONS = {
    "fdistill": "f-distill (Xu, Nie & Vahdat 2025, arXiv 2502.15681): a few-step generator distilled from the "
                "teacher by f-divergence distribution matching",
    "ddo": "Direct Discriminative Optimization (Zheng et al. 2025, arXiv 2503.01103): the pre-trained model "
           "fine-tuned as an implicit discriminator against its own samples",
    "diffusion_dpo": "Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): preference tuning on winner / loser "
                     "image pairs",
    "denoising": "a denoiser trained with the denoising loss (EDM parameterisation, Karras et al. 2022, "
                 "arXiv 2206.00364)",
}
METHOD_TITLES = {"fdistill": "f-distill generator", "ddo": "DDO fine-tuned model",
                 "diffusion_dpo": "Diffusion-DPO tuned model", "denoising": "Denoiser"}
# the settings a reader compares first; the card's config block holds all of them
KEY_SETTINGS = {
    "fdistill": ("divergence", "generator_sigmas", "lr", "critic_lr", "gan_weight", "guidance_scale",
                 "student_update_freq"),
    "ddo": ("alpha", "beta", "lr", "rounds"),
    "diffusion_dpo": ("objective", "beta", "finetune", "lora_rank", "lora_alpha", "lr", "scale_lr", "optimizer"),
    "denoising": ("lr", "weighting", "sigma_distribution", "p_mean", "p_std", "sigma_data"),
}
TRAIN_SETTINGS = ("steps", "batch_size", "mixed_precision", "ema_decays", "lr_scheduler", "seed")
# licenses of the public base models the recipes use (their model cards)
BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, shell-quoted, with the entry point shown as ``fdistill`` (it runs
    as the ``fdistill`` script, ``python -m fdistill.cli`` or under ``accelerate launch``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "(not recorded: the card was written after the run)"
    program = "fdistill" if argv and Path(argv[0]).stem in ("fdistill", "cli", "__main__") else Path(argv[0]).name
    return shlex.join([program, *argv[1:]])


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved ``run_dir/config.yaml`` as a dict ({} when the run was not started by ``fdistill train``)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def last_eval_metrics(metrics_path: Path) -> tuple[int, dict[str, float]] | None:
    """(step, {name: value}) of the last ``metrics.jsonl`` row with ``eval/`` metrics; None when there is none."""
    if not metrics_path.is_file():
        return None
    found = None
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        metrics = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if metrics:
            found = (row.get("step"), metrics)
    return found


def _json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_of(run_config: dict[str, Any], export_info: dict[str, Any]) -> str | None:
    """The model the run started from: a LoRA export's recorded base, else the ``model`` group's pretrained pipeline
    or teacher (hub id or path); None for a network trained from scratch."""
    model = run_config.get("model") or {}
    return export_info.get("base_model") or model.get("pretrained") or model.get("path_or_hub_id")


def student_steps(export_meta: dict[str, Any]) -> int | None:
    """Sampling steps of an exported generator (its noise levels), None for a multi-step denoiser."""
    if export_meta.get("kind") != "generator":
        return None
    return len(export_meta.get("generator_sigmas") or [export_meta.get("generator_sigma")])


def _is_hub_id(name: str | None) -> bool:
    from ..denoisers.io import HUB_ID

    return bool(name) and HUB_ID.match(name) is not None and not Path(name).exists()


def model_card_text(export_dir: Path, run_dir: Path, argv: list[str] | None = None) -> str:
    """The card's Markdown (front matter + body) for ``export_dir`` written by the run in ``run_dir``."""
    from huggingface_hub import ModelCardData
    from omegaconf import OmegaConf

    config = read_run_config(run_dir)
    method_settings = config.get("method") or {}
    method = method_settings.get("name", "unknown")
    dpo_info, meta = _json_file(export_dir / "fdistill_dpo.json"), _json_file(export_dir / "fdistill.json")
    base = base_model_of(config, dpo_info)
    steps = student_steps(meta)
    lora = dpo_info.get("finetune") == "lora"
    text_to_image = (export_dir / "model_index.json").is_file() or bool(dpo_info)
    tags = ["fdistill", method.replace("_", "-"), "diffusers"] + (["text-to-image"] if text_to_image else []) \
        + (["lora"] if lora else []) + ([f"f-divergence-{method_settings['divergence']}"] if method == "fdistill" else [])
    tags = list(dict.fromkeys(tags))
    hub_base = base if _is_hub_id(base) else None
    data = ModelCardData(library_name="diffusers", tags=tags, base_model=hub_base,
                         license=BASE_LICENSES.get(hub_base), pipeline_tag="text-to-image" if text_to_image else None)
    lines = [f"# {METHOD_TITLES.get(method, method)} (fdistill)", "",
             f"- **Method**: {METHOD_DESCRIPTIONS.get(method, method)}",
             f"- **Base model**: {f'[{base}](https://huggingface.co/{base})' if hub_base else base or 'none (no pre-trained checkpoint)'}"]
    if method == "fdistill":
        lines.append(f"- **Divergence**: {method_settings.get('divergence')}")
    if steps is not None:
        lines.append(f"- **Student sampling steps**: {steps}")
    if lora:
        lines.append(f"- **Weights**: LoRA (`pytorch_lora_weights.safetensors`), load on the base with "
                     f"`pipe.load_lora_weights(...)` or `fdistill sample --model <this directory>`")
    train = config.get("train") or {}
    settings = {**{f"method.{k}": method_settings.get(k) for k in KEY_SETTINGS.get(method, ())},
                **{f"train.{k}": train.get(k) for k in TRAIN_SETTINGS}}
    settings = {k: v for k, v in settings.items() if v is not None}      # unset = the documented default
    if settings:
        lines += ["", "## Hyper-parameters", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in settings.items()]
    evaluated = last_eval_metrics(run_dir / "metrics.jsonl")
    lines += ["", "## Metrics", ""]
    if evaluated:
        step, metrics = evaluated
        lines += [f"Last evaluation (step {step}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation was run (`eval=none`).")
    lines += ["", "## How it was made", "", "```bash", command_line(argv), "```"]
    if config:
        lines += ["", "<details><summary>Full resolved config (<code>config.yaml</code>)</summary>", "", "```yaml",
                  OmegaConf.to_yaml(OmegaConf.create(config)).rstrip(), "```", "", "</details>"]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(export_dir: str | Path, run_dir: str | Path, argv: list[str] | None = None) -> Path:
    """Write ``export_dir/README.md`` (``huggingface_hub.ModelCard``, which checks the front matter parses)."""
    from huggingface_hub import ModelCard

    path = Path(export_dir) / CARD_FILENAME
    ModelCard(model_card_text(Path(export_dir), Path(run_dir), argv)).save(path)
    return path


class HubPushError(RuntimeError):
    """An upload to the Hub that failed (network, authentication, permissions); the message names folder and repo."""


def push_export(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the Hub model repository ``repo_id`` and upload ``model_dir`` into it; returns the
    repository's URL. The token is ``token``, else huggingface_hub's own (``HF_TOKEN``, ``hf auth login``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), repo_type="model",
                          commit_message="Upload model trained with fdistill")
    except Exception as error:  # the transport's errors differ across huggingface_hub versions (requests, httpx)
        raise HubPushError(f"uploading {model_dir} to the Hub repository {repo_id} failed: "
                           f"{type(error).__name__}: {error}") from error
    return str(url)
