"""``fdistill fid`` and ``compute_metrics`` on folders / npz / models vs clean-fid with the same feature extractor."""
import json

from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from fdistill.cli import main as cli
from fdistill.denoisers.io import save_denoiser
from fdistill.evaluation import compute_metrics, digits_fd, digits_images
from fdistill.evaluation.extractors import PooledPixelFeatures
from fdistill.evaluation.fid import SourceOptions
from fdistill.networks import tiny_unet


CONF = Path(__file__).resolve().parent.parent / "conf"


def small_extractor():
    return PooledPixelFeatures(pool=4, dim=8)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 60, real.shape), 0, 255).astype(np.uint8)
    return write_folder(root / "real", real), write_folder(root / "fake", fake)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_folders_match_cleanfid_compute_fid_with_same_extractor(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path))
    real, fake = folders
    expected = cleanfid.compute_fid(str(fake), str(real), mode="clean", custom_feat_extractor=small_extractor(),
                                    num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False)
    ours = compute_metrics(str(fake), str(real), small_extractor(), options=SourceOptions(batch_size=16))
    assert ours["fid"] == pytest.approx(expected, rel=1e-4) and ours["num_gen"] == ours["num_ref"] == 40
    with_workers = compute_metrics(str(fake), str(real), small_extractor(),
                                   options=SourceOptions(batch_size=7, workers=2))
    assert with_workers["fid"] == pytest.approx(ours["fid"], rel=1e-6)


def test_cli_on_folder_and_npz_with_digits_features_writes_json(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    images, _ = digits_images()
    uint8 = ((images[:300, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "gen.npz", arr_0=uint8[..., None])                       # [N, H, W, 1]
    out = tmp_path / "result.json"
    args = ["fid", "--gen", str(tmp_path / "gen.npz"), "--ref", "digits", "--features", "digits", "--kid", "--pr",
            "--out", str(out), "--quiet"]
    assert cli(args) == 0
    result = json.loads(out.read_text())
    assert result["fid"] == pytest.approx(digits_fd(images[:300]), rel=1e-2)
    assert result["num_gen"] == 300 and abs(result["kid"]) < 3 * result["kid_std"] and result["precision"] > 0.9
    ref_folder = write_folder(tmp_path / "digits_png", uint8[:200])
    assert cli(["fid", "--gen", str(ref_folder), "--ref", str(ref_folder), "--features", "digits", "--quiet",
                "--out", str(out)]) == 0
    assert abs(json.loads(out.read_text())["fid"]) < 1e-6
    assert list((tmp_path / "cache" / "stats").glob("digits_png_*.npz"))           # reference statistics cached


def test_cli_reports_missing_inputs_cleanly(tmp_path, capsys):
    assert cli(["fid", "--gen", str(tmp_path / "missing"), "--ref", "digits", "--features", "digits"]) == 1
    assert "no such image folder, npz or model directory" in capsys.readouterr().err


def test_cli_samples_a_one_step_generator_directory(tmp_path):
    model_dir = save_denoiser(tiny_unet(num_classes=10), tmp_path / "generator", kind="generator", generator_sigma=80.0)
    out = tmp_path / "model.json"
    assert cli(["fid", "--gen", str(model_dir), "--num", "64", "--batch-size", "32", "--ref", "digits",
                "--features", "digits", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_gen"] == 64 and result["fid"] > 10                        # an untrained network is far off
    assert cli(["fid", "--gen", str(model_dir), "--ref", "digits", "--features", "digits"]) == 2   # needs --num


def test_eval_config_builds_an_evaluator_with_balanced_labels_and_class_tv():
    images, labels = digits_images()
    by_class = [images[labels == c] for c in range(10)]
    seen = []

    def generate(num, generator, cond):
        seen.append(cond)
        return torch.stack([by_class[int(c)][i % len(by_class[int(c)])] for i, c in enumerate(cond)])

    config = OmegaConf.merge(OmegaConf.load(CONF / "eval" / "digits_fd.yaml"),
                             {"num": 300, "batch_size": 128, "num_classes": 10})
    evaluate = instantiate(config, _convert_="all")
    metrics = evaluate(generate, step=5)
    assert torch.bincount(torch.cat(seen), minlength=10).tolist() == [30] * 10
    assert metrics["class_tv"] < 0.05 and metrics["fd_digits"] < 20


def test_fid_reads_a_sample_command_folder_without_its_preview_grid(tmp_path):
    """The new-user flow: `fdistill sample --out gen/` then `fdistill fid --gen gen/` (grid.png is not a sample)."""
    gen = tmp_path / "gen"
    assert cli(["sample", "--model", "digits-exact", "--num", "20", "--steps", "4", "--out", str(gen)]) == 0
    assert (gen / "grid.png").exists()
    out = tmp_path / "fid.json"
    assert cli(["fid", "--gen", str(gen), "--ref", "digits", "--features", "digits", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_gen"] == 20
    samples = tmp_path / "samples_only"
    samples.mkdir()
    for png in sorted(gen.glob("0*.png")):
        (samples / png.name).write_bytes(png.read_bytes())
    only = tmp_path / "only.json"
    assert cli(["fid", "--gen", str(samples), "--ref", "digits", "--features", "digits", "--quiet", "--out", str(only)]) == 0
    assert json.loads(only.read_text())["fid"] == pytest.approx(result["fid"], rel=1e-12)
