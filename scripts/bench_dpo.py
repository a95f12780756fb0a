"""Diffusion-DPO on CPU: a tiny Stable Diffusion on the built-in coloured-shape preference pairs.

1. A tiny SD is built from config; its VAE is trained briefly for reconstruction and its UNet is pre-trained with
   the plain denoising loss on winners AND losers (an unbiased reference: it draws the named colour about as
   often as another colour).
2. Diffusion-DPO (LoRA, and full fine-tuning with a reference copy) tunes it with the fdistill Trainer.
3. Reported: held-out implicit reward accuracy (fixed timesteps / noise, 4 draws per pair), the KNOWN reward of
   samples for fixed prompts and seeds before (reference) / after (tuned), per-step network evaluations, step
   time, and peak memory of LoRA vs full fine-tuning.

Memory: each mode runs in a fresh subprocess with a larger UNet (16 M parameters) so that weights and optimizer
state, not activations, dominate; the number is the increase of the process's peak resident set size (VmHWM,
reset through /proc/self/clear_refs after the components are loaded) while the method is built and trained for
3 steps of 2 pairs. tracemalloc cannot see PyTorch's CPU allocator, RSS can.

Threads: one intra-op thread (``--threads``); on a shared 2-core machine, 2 threads on tiny kernels were 20-50x
slower than 1 because of contention.

    python scripts/bench_dpo.py            # about 6-8 minutes on 2 CPU cores
    python scripts/bench_dpo.py --quick    # about 2 minutes, smaller numbers
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fdistill.data.base import DataSource
from fdistill.data.preference import all_images_as_winners, shape_preferences
from fdistill.methods.base import StepContext
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build
from fdistill.methods.dpo_eval import held_out_preference_metrics, reward_of_samples, save_side_by_side
from fdistill.pipelines import SDComponents
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training.config import SamplerConfig, TrainConfig
from fdistill.training.trainer import Trainer

IMAGE_SIZE = 8
SAMPLER = SamplerConfig(solver="dpmpp_2m", steps=15, guidance=1.0)
DEFAULT_RULES = ("colour", "brightness", "size")


def train(method, data: DataSource, steps: int, batch_size: int, run_dir: str) -> float:
    """Run the fdistill Trainer; returns seconds per step."""
    config = TrainConfig(steps=steps, batch_size=batch_size, device="cpu", run_dir=run_dir, resume="never",
                         checkpoint_every=10 ** 6, log_every=max(1, steps // 4), export=False, progress=False)
    started = time.perf_counter()
    Trainer(method, data, config).fit()
    return (time.perf_counter() - started) / steps


def pretrain_vae(components: SDComponents, images: torch.Tensor, steps: int) -> None:
    """Reconstruction + small KL training of the tiny VAE; then scaling_factor = 1 / std(latents)."""
    vae = components.vae
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (64,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample()).sample - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        std = vae.encode(images[:256]).latent_dist.mode().std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    vae.requires_grad_(True)


def pretrained_reference(components: SDComponents, data: DataSource, steps: int, run_dir: str):
    """A copy of ``components`` whose UNet is pre-trained by plain denoising on winners and losers alike (an
    unbiased reference); returns it and the seconds per pre-training step."""
    reference = copy.deepcopy(components)
    sft = build(DiffusionDPOConfig(objective="sft", finetune="full", lr=2e-3, weight_decay=0.0, sampler=SAMPLER),
                reference, data)
    seconds = train(sft, all_images_as_winners(data), steps, 32, run_dir)
    reference.unet = sft.networks["unet"]
    return reference, seconds


def pretrained_components(rule: str, train_data: DataSource, cache: str, vae_steps: int, pretrain_steps: int,
                          rules: tuple[str, ...] = DEFAULT_RULES) -> SDComponents:
    """The tiny SD (seed 0) with its VAE trained on the images of ``rules`` and its UNet pre-trained on ``rule``:
    read from ``cache`` (state dicts keyed by rule and step counts) or built and stored there, so that the
    benchmark and ``scripts/diagnose_dpo.py`` share the same reference."""
    torch.manual_seed(0)
    components = tiny_sd_components("sd15", IMAGE_SIZE, unet_channels=(32, 64))
    vae_file = Path(cache) / f"vae_{'-'.join(rules)}_{vae_steps}.pt"
    if vae_file.exists():
        state = torch.load(vae_file)
        components.vae.load_state_dict(state["vae"])
        components.vae.register_to_config(scaling_factor=state["scaling_factor"])
    else:
        images = torch.cat([torch.cat([d.dataset.x_w, d.dataset.x_l]) for d in
                            (shape_preferences(512, IMAGE_SIZE, split="train", rule=r) for r in rules)])
        pretrain_vae(components, images, vae_steps)
        vae_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": components.vae.state_dict(), "scaling_factor": components.vae.config.scaling_factor}, vae_file)
    unet_file = vae_file.with_name(f"unet_{rule}_{vae_file.stem}_{pretrain_steps}.pt")
    if unet_file.exists():
        components.unet.load_state_dict(torch.load(unet_file))
        return components
    with tempfile.TemporaryDirectory() as run_dir:
        reference, seconds = pretrained_reference(components, train_data, pretrain_steps, run_dir)
    torch.save(reference.unet.state_dict(), unet_file)
    print(f"pre-trained the {rule} reference: {seconds:.2f} s / step", file=sys.stderr)
    return reference


def count_unet_samples(method) -> list[int]:
    """Counts samples through every UNet forward (model + reference): per-step network evaluations."""
    counter = [0]
    unets = [method.networks["unet"]] + ([method.frozen["reference"]] if "reference" in method.frozen else [])
    for unet in unets:
        unet.register_forward_hook(lambda module, args, output: counter.__setitem__(0, counter[0] + len(args[0])))
    return counter


def dpo_run(components: SDComponents, finetune: str, train_data: DataSource, test_data: DataSource,
            args, workdir: str) -> dict:
    """Tune a copy of the pretrained components with DPO; returns metrics and sample images."""
    config = DiffusionDPOConfig(objective="dpo", beta=args.beta, finetune=finetune, lr=args.lr_lora if finetune ==
                                "lora" else args.lr_full, weight_decay=0.0, lora_rank=8, lora_alpha=8.0,
                                sampler=SAMPLER)
    method = build(config, copy.deepcopy(components), train_data)
    counter = count_unet_samples(method)
    method.loss("model", next(train_data.loader(args.batch)), StepContext(step=0))
    evals_per_pair = counter[0] / args.batch
    seconds = train(method, train_data, args.dpo_steps, args.batch, f"{workdir}/{finetune}")
    method.eval()
    metrics = held_out_preference_metrics(method, test_data.dataset, batch_size=128, draws=4)
    prompts = test_data.extras["prompts"] * args.samples_per_prompt
    reward = test_data.extras["reward"]
    tuned, tuned_images = reward_of_samples(method, prompts, reward, seed=1)
    before, reference_images = reward_of_samples(method, prompts, reward, seed=1, reference=True)
    trainable = sum(p.numel() for p in method.networks.parameters() if p.requires_grad)
    unet_params = sum(p.numel() for name in ("networks", "frozen") for n, p in getattr(method, name).named_parameters()
                      if "unet" in n or "reference" in n)
    return {"implicit_accuracy": metrics["implicit_accuracy"], "held_out_dpo_loss": metrics["dpo_loss"],
            "reward_reference": before, "reward_tuned": tuned, "sec_per_step": seconds,
            "unet_evals_per_pair": evals_per_pair, "trainable_params": trainable, "unet_params_held": unet_params,
            "images": (reference_images, tuned_images)}


# ---------------------------------------------------------------------------------------------- memory probe

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(finetune: str, threads: int) -> dict:
    """Peak RSS increase (MiB) of building + 3 training steps of a 16 M-parameter UNet, in this fresh process."""
    torch.set_num_threads(threads)
    components = tiny_sd_components("sd15", IMAGE_SIZE, unet_channels=(64, 128, 256))
    data = shape_preferences(16, IMAGE_SIZE)
    Path("/proc/self/clear_refs").write_text("5")          # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    config = DiffusionDPOConfig(finetune=finetune, beta=1000.0, lr=1e-4, weight_decay=0.0, sampler=SAMPLER)
    method = build(config, components, data)
    with tempfile.TemporaryDirectory() as run_dir:
        seconds = train(method, data, 3, 2, run_dir)
    return {"peak_rss_increase_mib": (_status_kib("VmHWM") - baseline) / 1024, "sec_per_step": seconds,
            "unet_params": sum(p.numel() for n, p in components.unet.named_parameters() if "lora_" not in n)}


def run_probe(finetune: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", finetune, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pre-training / DPO steps (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/dpo.json")
    parser.add_argument("--grid", default="runs/bench_dpo/side_by_side.png")
    parser.add_argument("--beta", type=float, default=1000.0)
    parser.add_argument("--lr-lora", type=float, default=3e-3)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="built-in preference rules")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--no-memory", action="store_true", help="skip the 16 M-parameter memory probes")
    parser.add_argument("--cache", default="runs/bench_dpo/references", help="pre-trained VAE / UNet state dicts")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.threads)))
        return
    torch.set_num_threads(args.threads)
    args.vae_steps, args.pretrain_steps, args.dpo_steps = (150, 150, 30) if args.quick else (300, 400, 80)
    args.samples_per_prompt = 2 if args.quick else 4
    started = time.perf_counter()
    splits = {rule: (shape_preferences(512, IMAGE_SIZE, split="train", rule=rule),
                     shape_preferences(256, IMAGE_SIZE, split="test", rule=rule)) for rule in args.rules}
    workdir = tempfile.mkdtemp(prefix="bench_dpo_")
    results = {}
    for rule, (train_data, test_data) in splits.items():
        reference = pretrained_components(rule, train_data, args.cache, args.vae_steps, args.pretrain_steps)
        for mode in args.modes:
            run = dpo_run(reference, mode, train_data, test_data, args, f"{workdir}/{rule}")
            grid = Path(args.grid)
            save_side_by_side(*run.pop("images"), grid.with_name(f"{grid.stem}_{rule}_{mode}{grid.suffix}"))
            results[f"{rule}/{mode}"] = run
    memory = {} if args.no_memory else {mode: run_probe(mode, args.threads) for mode in ("lora", "full")}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"2-core shared CPU VM", "torch": torch.__version__, "quick": args.quick,
        "setting": {"rules": args.rules, "image_size": IMAGE_SIZE, "train_pairs": 512, "test_pairs": 256, "beta": args.beta,
                    "batch_pairs": args.batch, "dpo_steps": args.dpo_steps, "pretrain_steps": args.pretrain_steps,
                    "vae_steps": args.vae_steps, "lr_lora": args.lr_lora, "lr_full": args.lr_full,
                    "sampler": f"{SAMPLER.solver} {SAMPLER.steps} steps", },
        "dpo": results, "memory_16M_unet": memory,
        "lora_memory_share": memory["lora"]["peak_rss_increase_mib"] / memory["full"]["peak_rss_increase_mib"]
        if memory else None,
        "total_sec": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    memory = report["memory_16M_unet"]
    rows = ["| rule / mode | held-out implicit acc. | known-rule reward ref -> tuned | UNet evals / pair / step "
            "| s / step (16 pairs) | trainable params | UNet params held | peak RSS +MiB (16 M UNet) |", "|" + "---|" * 8]
    for mode, r in report["dpo"].items():
        peak = memory[mode.split("/")[1]]["peak_rss_increase_mib"] if memory else float("nan")
        rows.append(f"| {mode} | {r['implicit_accuracy']:.3f} | {r['reward_reference']:.3f} -> {r['reward_tuned']:.3f} "
                    f"| {r['unet_evals_per_pair']:.0f} | {r['sec_per_step']:.2f} | {r['trainable_params']:,} "
                    f"| {r['unet_params_held']:,} | {peak:.0f} |")
    share = f"LoRA / full peak-memory share: {report['lora_memory_share']:.2f}; " if memory else ""
    rows.append(f"\n{share}total {report['total_sec']:.0f} s ({report['machine']})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
