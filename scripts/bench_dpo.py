"""Diffusion-DPO on CPU: a tiny Stable Diffusion on the built-in coloured-shape preference pairs.

1. A tiny SD is built from config; its VAE is trained briefly for reconstruction and its UNet is pre-trained with
   the plain denoising loss on winners AND losers (an unbiased reference: it draws the named colour about as
   often as another colour).
2. Diffusion-DPO (LoRA, and full fine-tuning with a reference copy) tunes it with the fdistill Trainer, each mode
   at its own pairs per step and steps (``MODE_SETTINGS``) with an LR PER PAIR that the optimizer runs at x pairs
   per step (the released code's ``--scale_lr``). Full fine-tuning takes 256 pairs per step, 16x LoRA's: at 16 it
   stays at chance on the caption-dependent colour rule (benchmarks/README.md, ``scripts/diagnose_dpo.py``).
3. Reported: held-out implicit reward accuracy (fixed timesteps / noise, 4 draws per pair), the KNOWN reward of
   samples for fixed prompts and seeds before (reference) / after (tuned), per-step network evaluations, step
   time, and peak memory of LoRA vs full fine-tuning.

Memory: each mode runs in a fresh subprocess with a larger UNet (16 M parameters) so that weights and optimizer
state, not activations, dominate; the number is the increase of the process's peak resident set size (VmHWM,
reset through /proc/self/clear_refs after the components are loaded) while the method is built and trained for
3 steps of 2 pairs. tracemalloc cannot see PyTorch's CPU allocator, RSS can.

Threads: one intra-op thread (``--threads``); on a shared 2-core machine, 2 threads on tiny kernels were 20-50x
slower than 1 because of contention.

    python scripts/bench_dpo.py            # 2 worker processes; about 45 minutes on 2 shared CPU cores
    python scripts/bench_dpo.py --quick    # DPO steps / 4, shorter pre-training: smaller numbers
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
REFERENCE_PAIRS, TEST_PAIRS = 512, 256
TRAIN_PAIRS = 8192
# mode -> (LR per pair, pairs per step, DPO steps); the optimizer's LR is LR per pair x pairs per step
MODE_SETTINGS = {"lora": (3e-3 / 16, 16, 80), "full": (4e-7, 256, 100)}


def train_config(steps: int, batch_size: int, run_dir: str) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, device="cpu", run_dir=run_dir, resume="never",
                       checkpoint_every=10 ** 6, log_every=max(1, steps // 4), export=False, progress=False)


def fit(method, data: DataSource, config: TrainConfig) -> float:
    """Run the fdistill Trainer; returns seconds per step."""
    started = time.perf_counter()
    Trainer(method, data, config).fit()
    return (time.perf_counter() - started) / config.steps


def train(method, data: DataSource, steps: int, batch_size: int, run_dir: str) -> float:
    """``fit`` with the benchmark's training settings; returns seconds per step."""
    return fit(method, data, train_config(steps, batch_size, run_dir))


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


def reference_pairs(rule: str) -> DataSource:
    """The pairs whose images pre-train the reference: the first REFERENCE_PAIRS training pairs of ``rule``."""
    return shape_preferences(REFERENCE_PAIRS, IMAGE_SIZE, split="train", rule=rule)


def dpo_cell(cell: tuple[str, str], args) -> dict:
    """One (rule, mode) cell of the table in this (worker) process: its metrics; the side-by-side grid is saved."""
    rule, mode = cell
    torch.set_num_threads(args.threads)
    reference = pretrained_components(rule, reference_pairs(rule), args.cache, args.vae_steps, args.pretrain_steps)
    train_data = shape_preferences(args.train_pairs, IMAGE_SIZE, split="train", rule=rule)
    test_data = shape_preferences(TEST_PAIRS, IMAGE_SIZE, split="test", rule=rule)
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as workdir:
        run = dpo_run(reference, mode, train_data, test_data, args, workdir)
    grid = Path(args.grid)
    save_side_by_side(*run.pop("images"), grid.with_name(f"{grid.stem}_{rule}_{mode}{grid.suffix}"))
    print(f"{rule}/{mode}: held-out implicit accuracy {run['implicit_accuracy']:.3f}, reward "
          f"{run['reward_reference']:.3f} -> {run['reward_tuned']:.3f}", file=sys.stderr, flush=True)
    return run


def count_unet_samples(method) -> list[int]:
    """Counts samples through every UNet forward (model + reference): per-step network evaluations."""
    counter = [0]
    unets = [method.networks["unet"]] + ([method.frozen["reference"]] if "reference" in method.frozen else [])
    for unet in unets:
        unet.register_forward_hook(lambda module, args, output: counter.__setitem__(0, counter[0] + len(args[0])))
    return counter


def dpo_settings(finetune: str, args, run_dir: str) -> tuple[DiffusionDPOConfig, TrainConfig]:
    """The method and training settings of one mode: its pairs per step, steps and LR per pair, which the
    optimizer runs at x pairs per step (``scale_lr``, the released code's ``--scale_lr``)."""
    batch, steps, lr_per_pair = (getattr(args, f"{name}_{finetune}") for name in ("batch", "steps", "lr"))
    config = DiffusionDPOConfig(objective="dpo", beta=args.beta, finetune=finetune, lr=lr_per_pair, scale_lr=True,
                                weight_decay=0.0, lora_rank=8, lora_alpha=8.0, sampler=SAMPLER)
    schedule = train_config(steps, batch, run_dir)
    config.check_train(schedule)
    return config, schedule


def dpo_run(components: SDComponents, finetune: str, train_data: DataSource, test_data: DataSource,
            args, workdir: str) -> dict:
    """Tune a copy of the pretrained components with DPO (``dpo_settings``); returns metrics and sample images."""
    config, schedule = dpo_settings(finetune, args, f"{workdir}/{finetune}")
    batch, steps = schedule.batch_size, schedule.steps
    method = build(config, copy.deepcopy(components), train_data)
    counter = count_unet_samples(method)
    method.loss("model", next(train_data.loader(batch)), StepContext(step=0))
    evals_per_pair = counter[0] / batch
    seconds = fit(method, train_data, schedule)
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
            "batch_pairs": batch, "steps": steps, "optimizer_lr": config.optimizer_lr(),
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

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` divides the DPO steps by 4 and shortens the pre-training."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pre-training / DPO steps (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=2, help="(rule, mode) cells run in parallel processes")
    parser.add_argument("--probe", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/dpo.json")
    parser.add_argument("--grid", default="runs/bench_dpo/side_by_side.png")
    parser.add_argument("--beta", type=float, default=1000.0)
    for mode, (lr, batch, steps) in MODE_SETTINGS.items():
        parser.add_argument(f"--lr-{mode}", type=float, default=lr, help=f"{mode}: LR per pair (x batch = optimizer LR)")
        parser.add_argument(f"--batch-{mode}", type=int, default=batch, help=f"{mode}: pairs per step")
        parser.add_argument(f"--steps-{mode}", type=int, default=steps, help=f"{mode}: DPO steps (--quick: / 4)")
    parser.add_argument("--train-pairs", type=int, default=TRAIN_PAIRS, help="DPO training pairs per rule")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="built-in preference rules")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--no-memory", action="store_true", help="skip the 16 M-parameter memory probes")
    parser.add_argument("--cache", default="runs/bench_dpo/references", help="pre-trained VAE / UNet state dicts")
    args = parser.parse_args(argv)
    args.vae_steps, args.pretrain_steps = (150, 150) if args.quick else (300, 400)
    if args.quick:
        args.steps_lora, args.steps_full = max(1, args.steps_lora // 4), max(1, args.steps_full // 4)
    args.samples_per_prompt = 2 if args.quick else 4
    return args


def main() -> None:
    args = parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.threads)))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for rule in args.rules:                    # build the cached references once, before the cells share them
        pretrained_components(rule, reference_pairs(rule), args.cache, args.vae_steps, args.pretrain_steps)
    cells = [(rule, mode) for mode in sorted(args.modes) for rule in args.rules]     # the long full-mode cells first
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = dict(zip(cells, pool.map(dpo_cell, cells, [args] * len(cells))))
    results = {f"{rule}/{mode}": runs[rule, mode] for rule in args.rules for mode in args.modes}
    memory = {} if args.no_memory else {mode: run_probe(mode, args.threads) for mode in ("lora", "full")}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"2-core shared CPU VM", "torch": torch.__version__, "quick": args.quick,
        "setting": {"rules": args.rules, "image_size": IMAGE_SIZE, "train_pairs": args.train_pairs,
                    "reference_pairs": REFERENCE_PAIRS, "test_pairs": TEST_PAIRS, "beta": args.beta,
                    "pretrain_steps": args.pretrain_steps, "vae_steps": args.vae_steps,
                    **{f"{name}_{mode}": getattr(args, f"{name}_{mode}") for mode in MODE_SETTINGS
                       for name in ("lr", "batch", "steps")}, "lr_is_per_pair": True,
                    "sampler": f"{SAMPLER.solver} {SAMPLER.steps} steps"},
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
    rows = ["| rule / mode | held-out implicit acc. | known-rule reward ref -> tuned | pairs / step x steps | optimizer LR "
            "| UNet evals / pair / step | s / step | trainable params | UNet params held | peak RSS +MiB (16 M UNet) |",
            "|" + "---|" * 10]
    for mode, r in report["dpo"].items():
        peak = memory[mode.split("/")[1]]["peak_rss_increase_mib"] if memory else float("nan")
        rows.append(f"| {mode} | {r['implicit_accuracy']:.3f} | {r['reward_reference']:.3f} -> {r['reward_tuned']:.3f} "
                    f"| {r['batch_pairs']} x {r['steps']} | {r['optimizer_lr']:.1e} "
                    f"| {r['unet_evals_per_pair']:.0f} | {r['sec_per_step']:.2f} | {r['trainable_params']:,} "
                    f"| {r['unet_params_held']:,} | {peak:.0f} |")
    share = f"LoRA / full peak-memory share: {report['lora_memory_share']:.2f}; " if memory else ""
    rows.append(f"\n{share}total {report['total_sec']:.0f} s ({report['machine']})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
