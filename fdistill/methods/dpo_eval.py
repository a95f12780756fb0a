"""Evaluation of a Diffusion-DPO model: implicit reward accuracy and DPO loss on held-out pairs (fixed draws), rewards
of generated images for the tuned and the reference model, side-by-side grids."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..losses.dpo import diffusion_dpo_loss
from .diffusion_dpo import DiffusionDPO
from .dpo_cache import ordered_batches


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
    for batch in ordered_batches(dataset, batch_size):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        encoded = method.encode_batch(batch)
        per_draw = [method.errors(encoded, generator, pairs=True) for _ in range(draws)]
        margins.append(torch.stack([(e["model_w"] - e["model_l"]) - (e["ref_w"] - e["ref_l"]) for e in per_draw]).mean(0))
        losses.append(torch.stack([diffusion_dpo_loss(e["model_w"], e["model_l"], e["ref_w"], e["ref_l"],
                                                      method.config.beta) for e in per_draw]).mean(0))
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
