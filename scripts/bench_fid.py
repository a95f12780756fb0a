"""Benchmark fdistill.evaluation against clean-fid 0.1.35 on this machine (CPU).

    python scripts/bench_fid.py            # d = 2048 Frechet distance, 2,000 images, 50k-sample memory (~10 min)
    python scripts/bench_fid.py --quick    # 1,000 images, 10k-sample memory

1. Frechet distance at d = 2048 (random covariances from 3,000 samples): fdistill's Cholesky + eigvalsh form vs
   clean-fid's ``frechet_distance`` (scipy.linalg.sqrtm); wall and CPU seconds, values, relative difference.
2. Feature-extraction throughput on the same PNG folder (32x32 RGB) with the same extractor, clean mode: clean-fid's
   ``get_folder_features`` (per-image, per-channel PIL resize in its data loader) vs fdistill's ``source_statistics``
   (batched matrix form of the same resize). The extractor is small (8x8 average pool + fixed 64-d projection) so
   the preprocessing cost is what is measured: Inception weights cannot be downloaded here (offline).
3. Peak memory of statistics for N 2048-d features: fdistill's streaming ``FeatureStats`` vs keeping all features and
   calling np.cov (clean-fid), each in a fresh subprocess (peak RSS above the baseline after imports).

Prints a markdown table and writes ``benchmarks/fid.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdistill.evaluation import FeatureStats, build_feature_extractor, frechet_distance
from fdistill.evaluation.extractors import PooledPixelFeatures
from fdistill.evaluation.fid import SourceOptions, source_statistics


def timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def bench_frechet(dim: int = 2048, samples: int = 3000) -> dict:
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    rng = np.random.default_rng(0)
    stats = []
    for scale in (1.0, 1.2):
        features = rng.standard_normal((samples, dim)) * scale + rng.standard_normal(dim)
        stats += [features.mean(0), np.cov(features, rowvar=False)]
    ours, ours_wall, ours_cpu = timed(frechet_distance, *stats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs, theirs_wall, theirs_cpu = timed(cleanfid_frechet_distance, *stats)
    return {"dim": dim, "fdistill_value": ours, "cleanfid_value": float(theirs),
            "relative_difference": abs(ours - theirs) / abs(theirs), "fdistill_wall_s": ours_wall,
            "cleanfid_wall_s": theirs_wall, "fdistill_cpu_s": ours_cpu, "cleanfid_cpu_s": theirs_cpu,
            "speedup_wall": theirs_wall / ours_wall}


def write_images(folder: Path, num: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def bench_throughput(num: int, workers: int, batch_size: int = 100) -> dict:
    from cleanfid.fid import get_folder_features

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "images"
        write_images(folder, num)
        extractor = build_feature_extractor(PooledPixelFeatures())
        feats, theirs_wall, _ = timed(get_folder_features, str(folder), PooledPixelFeatures().eval(),
                                      num_workers=workers, batch_size=batch_size, device=torch.device("cpu"),
                                      mode="clean", verbose=False)
        stats, ours_wall, _ = timed(source_statistics, str(folder), extractor,
                                    options=SourceOptions(batch_size=batch_size, workers=workers))
    mean_difference = float(np.abs(stats.mu - feats.mean(0)).max())
    return {"images": num, "image_size": "32x32 -> 299x299", "workers": workers, "batch_size": batch_size,
            "cleanfid_images_per_s": num / theirs_wall, "fdistill_images_per_s": num / ours_wall,
            "speedup": theirs_wall / ours_wall, "max_abs_feature_mean_difference": mean_difference}


MEMORY_CHILD = r"""
import sys, numpy as np, torch
from fdistill.evaluation import FeatureStats
def rss_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
num, dim, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
generator = torch.Generator().manual_seed(0)
batches = (torch.randn(500, dim, generator=generator) for _ in range(num // 500))
baseline = rss_kib("VmRSS:")
if kind == "streaming":
    stats = FeatureStats(dim)
    for batch in batches:
        stats.update(batch)
    mu, sigma = stats.mean, stats.cov
else:
    features = np.concatenate([batch.numpy() for batch in batches])
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
print(rss_kib("VmHWM:") - baseline)
"""


def bench_memory(num: int, dim: int = 2048) -> dict:
    result = {"samples": num, "dim": dim}
    for kind in ("streaming", "all_features"):
        output = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(num), str(dim), kind], check=True,
                                capture_output=True, text=True).stdout
        result[f"{kind}_peak_mib"] = int(output.split()[-1]) / 1024
    result["streaming_state_mib"] = (dim * dim + dim + 1) * 8 / 2**20
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fid.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    images, memory_samples = (1000, 10_000) if args.quick else (2000, 50_000)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
               "torch": torch.__version__, "quick": args.quick,
               "extractor": "PooledPixelFeatures (8x8 avg pool + fixed 64-d projection); Inception weights unavailable "
                            "offline", "frechet": bench_frechet(), "throughput": bench_throughput(images, args.workers),
               "memory": bench_memory(memory_samples)}
    fr, th, me = results["frechet"], results["throughput"], results["memory"]
    rows = [
        ("Frechet distance d=2048, wall s", fr["cleanfid_wall_s"], fr["fdistill_wall_s"], fr["speedup_wall"]),
        ("Frechet distance d=2048, CPU s", fr["cleanfid_cpu_s"], fr["fdistill_cpu_s"],
         fr["cleanfid_cpu_s"] / fr["fdistill_cpu_s"]),
        (f"features, {th['images']} PNGs 32->299, img/s", th["cleanfid_images_per_s"], th["fdistill_images_per_s"],
         th["speedup"]),
        (f"statistics of {me['samples']} x 2048 features, peak MiB", me["all_features_peak_mib"],
         me["streaming_peak_mib"], me["all_features_peak_mib"] / max(me["streaming_peak_mib"], 1e-9)),
    ]
    print("| measure | clean-fid | fdistill | ratio |\n|---|---|---|---|")
    for name, theirs, ours, ratio in rows:
        print(f"| {name} | {theirs:.3g} | {ours:.3g} | {ratio:.2f}x |")
    print(f"\nFrechet values: fdistill {fr['fdistill_value']:.10g}, clean-fid {fr['cleanfid_value']:.10g} "
          f"(relative difference {fr['relative_difference']:.1e}); feature means differ by at most "
          f"{th['max_abs_feature_mean_difference']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
