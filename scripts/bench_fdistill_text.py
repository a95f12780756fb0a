"""Text-to-image f-distill on CPU: a tiny Stable Diffusion teacher on the built-in captioned shapes, distilled into a
one-step generator.

1. A tiny SD is built from config; its VAE is trained briefly (reconstruction) and its UNet is pre-trained as a
   text-conditional denoiser on "a <colour> <shape>" images (10 % empty captions, so classifier-free guidance works).
2. The teacher is sampled with DPM-Solver++ 2M (20 steps, CFG ``--guidance``); each divergence distils a copy of
   it into a one-step generator with the text-to-image method (``fdistill.methods.fdistill.text``, the same code as
   the SD1.5 / SDXL recipes), with the fdistill Trainer.
3. Reported for the teacher and each student, on fixed prompts (every caption x ``--per-prompt`` seeds): colour
   accuracy (share of images whose dominant colour is the caption's colour; the data has 1.0, a random generator
   0.25), the mean colour reward of the built-in rule, the within-prompt spread (pixel std across seeds of one prompt:
   0 = collapse), NFE, and seconds per distillation step.

Threads: one intra-op thread (``--threads``); tiny kernels on a shared 2-core machine are slower with two.

    python scripts/bench_fdistill_text.py            # about 15 minutes on 2 CPU cores
    python scripts/bench_fdistill_text.py --quick    # about 5 minutes, smaller numbers
Writes benchmarks/fdistill_text.json and runs/bench_fdistill_text/samples.png (rows: teacher, then each student).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench_dpo import IMAGE_SIZE, pretrain_vae, train
from fdistill.data import captioned_shapes
from fdistill.data.preference import caption_colour_accuracy, shape_colour_reward, shape_preferences
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig, build as build_sft
from fdistill.methods.dpo_eval import save_side_by_side
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.tiny_sd import tiny_sd_components
from fdistill.training.config import SamplerConfig


def pretrained_teacher(args, images_source, workdir: str):
    """Tiny SD components with a VAE fitted to the shapes and a UNet pre-trained by denoising on captioned shapes;
    returns (components, the SFT method for teacher sampling, seconds per pre-training step)."""
    torch.manual_seed(0)
    components = tiny_sd_components("sd15", IMAGE_SIZE, unet_channels=(32, 64))
    pretrain_vae(components, images_source.dataset.x_w, args.vae_steps)
    sampler = SamplerConfig(solver="dpmpp_2m", steps=20, guidance=args.guidance)
    sft = build_sft(DiffusionDPOConfig(objective="sft", finetune="full", lr=2e-3, weight_decay=0.0, sampler=sampler),
                    components, images_source)
    sec_per_step = train(sft, images_source, args.pretrain_steps, 32, f"{workdir}/teacher")
    components.unet = sft.networks["unet"]
    return components, sft.eval(), sec_per_step


def metrics(images: torch.Tensor, prompts: list[str], per_prompt: int) -> dict[str, float]:
    """Colour accuracy, colour reward and within-prompt spread of images [N, 3, H, W] (prompts repeat per seed)."""
    by_prompt = images.reshape(per_prompt, len(prompts) // per_prompt, *images.shape[1:])
    return {"colour_accuracy": caption_colour_accuracy(images, prompts),
            "colour_reward": float(shape_colour_reward(images, prompts).mean()),
            "within_prompt_std": float(by_prompt.std(dim=0).mean())}


def distil(components, divergence: str, args, workdir: str):
    """A one-step student distilled from a copy of the teacher; returns (metrics dict, the method)."""
    config = FDistillConfig(divergence=divergence, lr=args.lr, gan_weight=args.gan_weight,
                            guidance_scale=args.guidance, student_update_freq=args.student_update_freq,
                            sigma_distribution="karras", sigma_min=0.03, sigma_max=14.6, weight_decay=0.0)
    data = captioned_shapes(512, IMAGE_SIZE, seed=1)
    method = build(config, copy.deepcopy(components), data)
    sec_per_step = train(method, data, args.steps, args.batch, f"{workdir}/{divergence}")
    return {"sec_per_step": sec_per_step, "nfe": 1}, method.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pre-training / distillation steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--divergences", nargs="+", default=["rkl", "js"])
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gan-weight", type=float, default=1e-2)
    parser.add_argument("--student-update-freq", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/fdistill_text.json")
    parser.add_argument("--grid", default="runs/bench_fdistill_text/samples.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.vae_steps, args.pretrain_steps, args.steps = (150, 200, 200) if args.quick else (300, 500, 600)
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_fdistill_text_")
    shapes = shape_preferences(512, IMAGE_SIZE, split="train", empty_caption_prob=0.1)   # winners = captioned shapes
    components, teacher, pretrain_sec = pretrained_teacher(args, shapes, workdir)
    prompts = shapes.extras["prompts"] * args.per_prompt
    teacher_images = teacher.sample_images(prompts, torch.Generator().manual_seed(1))
    results = {"teacher": {**metrics(teacher_images, prompts, args.per_prompt), "nfe": 2 * 20}}
    rows = [teacher_images[:len(shapes.extras["prompts"])]]
    for divergence in args.divergences:
        run, student = distil(components, divergence, args, workdir)
        images = student.generate(len(prompts), torch.Generator().manual_seed(1), cond=prompts)
        results[divergence] = {**metrics(images, prompts, args.per_prompt), **run}
        rows.append(images[:len(shapes.extras["prompts"])])
    save_side_by_side(rows[0], torch.cat(rows[1:]), args.grid)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"2-core shared CPU VM", "torch": torch.__version__, "quick": args.quick,
        "setting": {"image_size": IMAGE_SIZE, "guidance": args.guidance, "lr": args.lr, "gan_weight": args.gan_weight,
                    "student_update_freq": args.student_update_freq, "batch": args.batch, "steps": args.steps,
                    "pretrain_steps": args.pretrain_steps, "vae_steps": args.vae_steps,
                    "prompts": len(shapes.extras["prompts"]), "per_prompt": args.per_prompt,
                    "pretrain_sec_per_step": pretrain_sec,
                    "teacher_sampler": "dpmpp_2m, 20 steps, CFG (2 UNet evaluations per step)"},
        "results": results, "total_sec": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| generator | NFE | colour accuracy | colour reward | within-prompt std | s / step |",
             "|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        label = "teacher (DPM-Solver++ 2M, 20 steps, CFG)" if name == "teacher" else f"one-step student, {name}"
        seconds = f"{row['sec_per_step']:.3f}" if "sec_per_step" in row else "-"
        lines.append(f"| {label} | {row['nfe']} | {row['colour_accuracy']:.3f} | {row['colour_reward']:.4f} | "
                     f"{row['within_prompt_std']:.4f} | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
