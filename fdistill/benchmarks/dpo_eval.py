"""Score a Diffusion-DPO tuned model against its base with a reward model (Wallace et al. 2023, Sec. 5).

For every prompt and seed, the base and the tuned model sample from the SAME initial noise (fdistill sampler in
latent space, then the VAE decoder); a reward scorer (``fdistill.evaluation.rewards``: pickscore | clip | hpsv2 |
aesthetic) scores both. Printed and written to ``<out>/eval_dpo.json``: mean rewards of base and tuned, and the win
rate of tuned over base (ties count 1/2). ``<out>/side_by_side.png``: base samples (top row) above tuned samples
(seed 0).

    python scripts/eval_dpo.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --tuned outputs/run/model \
        --prompts partiprompts.parquet --num-prompts 200 --scorer pickscore --seeds 4 --out dpo_eval

``--tuned`` is what ``DiffusionDPO.export`` wrote (``run_dir/model``): a full pipeline directory (``unet/``) or
LoRA weights (``pytorch_lora_weights.safetensors``). ``--prompts``: a text file (one prompt per line) or a parquet
file with a ``Prompt`` / ``prompt`` / ``caption`` column (PartiPrompts: ``Prompt``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch

from fdistill.evaluation.rewards import SCORERS, build_scorer, win_rate
from fdistill.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from fdistill.methods.dpo_eval import sample_rewards, save_side_by_side
from fdistill.pipelines import SDComponents, build_pipeline, load_sd_components
from fdistill.samplers.config import SamplerConfig

PROMPT_COLUMNS = ("Prompt", "prompt", "caption", "text")
LORA_FILE = "pytorch_lora_weights.safetensors"


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """Prompts of a text file (one per non-empty line) or a parquet file (first column of ``PROMPT_COLUMNS``)."""
    if path.endswith(".parquet"):
        import pandas as pd

        table = pd.read_parquet(path)
        column = next((c for c in PROMPT_COLUMNS if c in table.columns), None)
        if column is None:
            raise ValueError(f"{path}: no prompt column; expected one of {PROMPT_COLUMNS}, found {list(table.columns)}")
        prompts = [str(p) for p in table[column]]
    else:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts[:limit]


def load_tuned_unet(base: SDComponents, tuned: str) -> torch.nn.Module:
    """The tuned UNet of an export: a full pipeline's ``unet/`` (directory or hub id) or the base UNet with the
    export's LoRA weights loaded."""
    from diffusers import UNet2DConditionModel

    if (Path(tuned) / LORA_FILE).is_file():
        unet = copy.deepcopy(base.unet)
        build_pipeline(dataclasses.replace(base, unet=unet)).load_lora_weights(tuned)
        return unet
    return UNet2DConditionModel.from_pretrained(tuned, subfolder="unet")


def evaluator(base: SDComponents, tuned_unet: torch.nn.Module, sampler: SamplerConfig,
              resolution: int | None) -> DiffusionDPO:
    """A DiffusionDPO whose trained network is the tuned UNet and whose reference is the base UNet."""
    size = resolution or base.unet.config.sample_size * base.vae_scale_factor
    method = DiffusionDPO(DiffusionDPOConfig(finetune="full", sampler=sampler),
                          dataclasses.replace(base, unet=tuned_unet), (size, size))
    method.frozen["reference"] = base.unet.requires_grad_(False).eval()
    return method


def evaluate(method: DiffusionDPO, prompts: list[str], scorer, seeds: int) -> dict:
    """Paired rewards of base (reference) and tuned samples for every prompt and seed; the summary dict."""
    base_scores, tuned_scores, grids = [], [], []
    for seed in range(seeds):
        base, base_images = sample_rewards(method, prompts, scorer, seed, reference=True)
        tuned, tuned_images = sample_rewards(method, prompts, scorer, seed)
        base_scores.append(base)
        tuned_scores.append(tuned)
        grids.append((base_images, tuned_images))
    base, tuned = torch.stack(base_scores), torch.stack(tuned_scores)          # [seeds, prompts]
    return {"mean_reward_base": base.mean().item(), "mean_reward_tuned": tuned.mean().item(),
            "win_rate": win_rate(tuned, base), "rewards_base": base.tolist(), "rewards_tuned": tuned.tolist(),
            "grids": grids}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/eval_dpo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base pipeline directory or hub id")
    parser.add_argument("--tuned", required=True, help="the DPO export (run_dir/model): pipeline dir or LoRA dir")
    parser.add_argument("--kind", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--prompts", required=True, help="text file (one per line) or parquet (PartiPrompts)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--scorer", default="pickscore", choices=sorted(SCORERS))
    parser.add_argument("--scorer-model", default=None, help="scorer weights: hub id / local path (default per scorer)")
    parser.add_argument("--scorer-processor", default=None,
                        help="pickscore: AutoProcessor id or path; clip: open_clip pretrained tag or weights file; "
                             "hpsv2: open_clip architecture (ViT-H-14); aesthetic: open_clip CLIP (ViT-L-14 openai)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's native size)")
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in the side-by-side grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="dpo_eval")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    prompts = read_prompts(args.prompts, args.num_prompts)
    scorer = build_scorer(args.scorer, args.scorer_model, args.scorer_processor, device=args.device)
    base = load_sd_components(args.base, args.kind)
    sampler = SamplerConfig(solver=args.solver, steps=args.steps, guidance=args.guidance)
    method = evaluator(base, load_tuned_unet(base, args.tuned), sampler, args.resolution).to(args.device)
    result = evaluate(method, prompts, scorer, args.seeds)
    base_images, tuned_images = result.pop("grids")[0]
    out = Path(args.out)
    save_side_by_side(base_images[:args.grid_prompts], tuned_images[:args.grid_prompts], out / "side_by_side.png")
    result.update(base=args.base, tuned=args.tuned, scorer=args.scorer, scorer_model=args.scorer_model,
                  prompts=prompts, seeds=args.seeds, sampler=dataclasses.asdict(sampler))
    (out / "eval_dpo.json").write_text(json.dumps(result, indent=2))
    print(f"| scorer | prompts x seeds | mean reward base | mean reward tuned | win rate tuned > base |\n"
          f"|---|---|---|---|---|\n| {args.scorer} | {len(prompts)} x {args.seeds} | {result['mean_reward_base']:.4f} "
          f"| {result['mean_reward_tuned']:.4f} | {result['win_rate']:.3f} |")
    print(f"wrote {out / 'eval_dpo.json'} and {out / 'side_by_side.png'}")
    return result

