"""Why does full fine-tuning not learn the colour rule in ``bench_dpo.py``? Training-dynamics diagnostics.

For one rule and the bench's pretrained tiny SD, Diffusion-DPO runs (LoRA and full, several learning rates / betas)
with the same optimizer as the Trainer (AdamW, clip 1.0, no weight decay) and records every few steps: the DPO
loss, the pre-clip gradient norm, the implicit accuracy on 256 TRAIN pairs and 256 HELD-OUT pairs (fixed draws),
and the relative change of the model's function, ||D_theta(x) - D_ref(x)|| / ||D_ref(x)|| on fixed noisy held-out
latents (comparable between LoRA and full). It also checks the reference copy: frozen, eval mode, same dtype,
bitwise equal to the initial UNet after training.

    python scripts/diagnose_dpo.py --rule colour --runs lora:3e-3 full:5e-5 full:5e-4 --out runs/diag/colour.json
    python scripts/diagnose_dpo.py --rule colour --runs full:1e-5 --every 40 --clip inf --out ...   # no clipping
    python scripts/diagnose_dpo.py --rule colour --runs --gradient-groups --out ...   # gradient table only
    python scripts/diagnose_dpo.py --rule colour --runs full:1e-4 --batch 256 --train-pairs 16384 --out ...
    python scripts/diagnose_dpo.py --rule colour --runs full:2e-4 --batch 256 --only to_q to_k to_v to_out.0 ...
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import IMAGE_SIZE, SAMPLER, pretrained_components  # noqa: E402

from fdistill.data.preference import shape_preferences  # noqa: E402
from fdistill.losses.denoising import noisy_sample  # noqa: E402
from fdistill.methods.base import StepContext  # noqa: E402
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build  # noqa: E402
from fdistill.methods.dpo_eval import held_out_preference_metrics  # noqa: E402


@torch.no_grad()
def function_change(method, encoded) -> float:
    """||D_theta - D_ref|| / ||D_ref|| of the denoised latents at fixed sigma / noise on held-out winners."""
    latents = encoded["latents_w"]
    generator = torch.Generator().manual_seed(7)
    model = method._training_denoiser("model", method.networks["unet"])
    sigma = model.train_sigmas[torch.randint(len(model.train_sigmas), (len(latents),), generator=generator)]
    noisy = noisy_sample(latents, sigma, torch.randn(latents.shape, generator=generator))
    tuned = model(noisy, sigma, encoded["cond"])
    with method.reference_unet() as reference:
        ref = method._training_denoiser("reference", reference)(noisy, sigma, encoded["cond"])
    return float((tuned - ref).norm() / ref.norm())


def parameter_group(name: str) -> str:
    """The UNet parameter groups of the gradient table: the text path, the other LoRA targets, everything else."""
    if "attn2.to_k" in name or "attn2.to_v" in name:
        return "cross_attn_kv (text)"
    if any(target in name for target in ("to_q", "to_k", "to_v", "to_out.0")):
        return "other attention projections (LoRA targets)"
    return "rest (convs, norms, time embedding, ...)"


def gradient_by_group(components, train, beta: float, batches: int = 12, batch: int = 16) -> dict:
    """Full-mode DPO gradients at the reference, per parameter group over ``batches`` batches: the mean per-batch
    norm, the norm of the mean, and signal / noise = ||mean|| / (mean per-batch deviation / sqrt(batches))
    (~1: the mean of the batches is at the noise floor)."""
    method = build(DiffusionDPOConfig(finetune="full", beta=beta, weight_decay=0.0, sampler=SAMPLER),
                   copy.deepcopy(components), train)
    unet, loader, grads = method.networks["unet"], train.loader(batch), []
    for step in range(batches):
        unet.zero_grad()
        method.loss("model", next(loader), StepContext(step))[0].backward()
        grads.append({n: p.grad.detach().clone() for n, p in unet.named_parameters()})
    table = {}
    for group in sorted({parameter_group(n) for n in grads[0]}):
        flat = torch.stack([torch.cat([g[n].flatten() for n in g if parameter_group(n) == group]) for g in grads])
        mean = flat.mean(0)
        table[group] = {"params": flat.shape[1], "per_batch_grad_norm": float(flat.norm(dim=1).mean()),
                        "mean_grad_norm": float(mean.norm()),
                        "signal_to_noise": float(mean.norm() / (flat - mean).norm(dim=1).mean() * batches ** 0.5)}
    return table


def run(components, mode: str, lr: float, beta: float, train, test, steps: int, batch: int, every: int,
        clip: float, adam_betas: tuple[float, float] = (0.9, 0.999), only: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    config = DiffusionDPOConfig(objective="dpo", beta=beta, finetune=mode, lr=lr, weight_decay=0.0, sampler=SAMPLER)
    method = build(config, copy.deepcopy(components), train)
    initial = {k: v.clone() for k, v in method.networks["unet"].state_dict().items()}
    if only:            # diagnostic: full fine-tuning of the named weights only (which weights carry the rule?)
        for name, parameter in method.networks["unet"].named_parameters():
            parameter.requires_grad_(any(part in name for part in only))
    params = [p for p in method.networks.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=adam_betas, weight_decay=0.0)
    probe = method.encode_batch(next(iter(torch.utils.data.DataLoader(test.dataset, batch_size=64))))
    train_eval = torch.utils.data.Subset(train.dataset, range(256))
    loader, history = train.loader(batch), []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            method.eval()
            row = {"step": step, "train_acc": held_out_preference_metrics(method, train_eval, 128, draws=2)["implicit_accuracy"],
                   "held_out_acc": held_out_preference_metrics(method, test.dataset, 128, draws=2)["implicit_accuracy"],
                   "function_change": function_change(method, probe)}
            history.append(row)
            print(f"  {mode} lr {lr:g} step {step}: train {row['train_acc']:.3f} held-out {row['held_out_acc']:.3f} "
                  f"function change {row['function_change']:.3f}", file=sys.stderr, flush=True)
            method.train()
        if step == steps:
            break
        loss, logs = method.loss("model", next(loader), StepContext(step=step))
        optimizer.zero_grad()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        if step % every == 0:
            history[-1].update(loss=logs["loss"], grad_norm=norm, batch_acc=logs["implicit_accuracy"])
    trained_param_change = float(torch.sqrt(sum((p.detach() - initial[n]).pow(2).sum() for n, p in
                                                method.networks["unet"].named_parameters() if n in initial and
                                                p.requires_grad)) / torch.sqrt(sum(initial[n].pow(2).sum() for n, p in
                                                method.networks["unet"].named_parameters() if n in initial and p.requires_grad))) \
        if mode == "full" else None
    reference_check = None
    if mode == "full":
        ref = method.frozen["reference"]
        reference_check = {"frozen": not any(p.requires_grad for p in ref.parameters()), "eval_mode": not ref.training,
                           "same_dtype": next(ref.parameters()).dtype == next(method.networks["unet"].parameters()).dtype,
                           "equals_initial_unet": all(torch.equal(v, initial[k]) for k, v in ref.state_dict().items())}
    return {"mode": mode, "lr": lr, "beta": beta, "clip": clip, "batch_pairs": batch, "adam_betas": list(adam_betas),
            "train_pairs": len(train.dataset), "only": only,
            "history": history, "relative_param_change": trained_param_change,
            "reference_check": reference_check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="colour")
    parser.add_argument("--runs", nargs="*", default=["lora:3e-3", "full:5e-5"], help="mode:lr[:beta]")
    parser.add_argument("--beta", type=float, default=1000.0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gradient-groups", action="store_true", help="also the gradient table by parameter group")
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm (inf: measured, not clipped)")
    parser.add_argument("--train-pairs", type=int, default=512, help="DPO training pairs (the reference is always "
                        "pre-trained on the first 512, the benchmark's)")
    parser.add_argument("--only", nargs="+", help="full mode: train only the UNet weights whose names contain one of "
                        "these (e.g. to_q to_k to_v to_out.0: the LoRA targets at full rank)")
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    parser.add_argument("--cache", default="runs/bench_dpo/references")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    train = shape_preferences(512, IMAGE_SIZE, split="train", rule=args.rule)
    test = shape_preferences(256, IMAGE_SIZE, split="test", rule=args.rule)
    components = pretrained_components(args.rule, shape_preferences(512, IMAGE_SIZE, split="train", rule=args.rule),
                                       args.cache, 300, 400)
    train = shape_preferences(args.train_pairs, IMAGE_SIZE, split="train", rule=args.rule)
    results, gradients = [], gradient_by_group(components, train, args.beta) if args.gradient_groups else None
    if gradients:
        print(json.dumps(gradients, indent=1))
    for spec in args.runs:
        mode, lr, *beta = spec.split(":")
        results.append(run(components, mode, float(lr), float(beta[0]) if beta else args.beta, train, test,
                           args.steps, args.batch, args.every, args.clip, tuple(args.adam_betas),
                           args.only))
        r = results[-1]
        print(json.dumps({k: r[k] for k in ("mode", "lr", "beta", "clip", "batch_pairs", "train_pairs", "adam_betas",
                                            "relative_param_change", "reference_check")}), flush=True)
        for row in r["history"]:
            print("  ", json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rule": args.rule, "steps": args.steps, "batch_pairs": args.batch,
                                          "runs": results, "gradient_by_parameter_group": gradients, "total_sec": time.perf_counter() - started}, indent=2))


if __name__ == "__main__":
    main()
