"""Malformed inputs to ``fdistill fid`` and ``fdistill sample`` are refused with one line naming the file or option
(exit 2 for an option, 1 for a bad file or a failure while running); Inception weights are checked against the
published SHA-256; the statistics cache is keyed on the extractor's weights; write failures are named."""
from __future__ import annotations

import errno
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from PIL import Image

from fdistill.cli import main as cli
from fdistill.denoisers import load_denoiser, save_denoiser
from fdistill.evaluation import compute_metrics, inception
from fdistill.evaluation.extractors import PooledPixelFeatures, build_feature_extractor, clip_weights_id
from fdistill.evaluation.fid import SourceOptions
from fdistill.networks import tiny_unet


def fid(*args: str) -> int:
    return cli(["fid", "--quiet", "--features", "digits", *args])


def sample(*args: str) -> int:
    return cli(["sample", "--no-progress", *args])


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in error
    return error


def digits_uint8(count: int = 120) -> np.ndarray:
    """[count, 8, 8, 1] uint8 sklearn digits."""
    from fdistill.evaluation import digits_images

    return ((digits_images()[0][:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()[..., None]


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:04d}.png")
    return folder


# ------------------------------------------------------------------------------------------------ fid: npz values


def test_float_npz_needs_its_range_stated_and_the_range_must_fit(tmp_path, capsys):
    images = digits_uint8()
    np.savez(tmp_path / "u8.npz", images=images)
    np.savez(tmp_path / "f255.npz", images=images.astype(np.float32))
    np.savez(tmp_path / "f01.npz", images=images.astype(np.float32) / 255)
    reference = str(tmp_path / "out.json")
    assert fid("--gen", str(tmp_path / "u8.npz"), "--ref", "digits", "--out", reference) == 0
    expected = json.loads((tmp_path / "out.json").read_text())["fid"]

    assert fid("--gen", str(tmp_path / "f255.npz"), "--ref", "digits") == 2
    error = one_line_error(capsys)
    assert "f255.npz" in error and "--float-range=0..255" in error
    assert fid("--gen", str(tmp_path / "f255.npz"), "--ref", "digits", "--float-range", "0..1") == 1
    assert "do not fit the stated range 0..1" in one_line_error(capsys)
    assert fid("--gen", str(tmp_path / "f01.npz"), "--ref", "digits", "--float-range", "0..255") == 1
    assert "they look like 0..1" in one_line_error(capsys)

    for name, stated in (("f255.npz", "0..255"), ("f01.npz", "0..1")):
        out = tmp_path / f"{name}.json"
        assert fid("--gen", str(tmp_path / name), "--ref", "digits", "--float-range", stated, "--out", str(out)) == 0
        assert json.loads(out.read_text())["fid"] == pytest.approx(expected, rel=1e-6)


def test_non_finite_images_and_statistics_are_errors_naming_the_file(tmp_path, capsys):
    images = digits_uint8().astype(np.float32) / 127.5 - 1
    images[3, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    assert fid("--gen", str(tmp_path / "nan.npz"), "--ref", "digits", "--float-range=-1..1") == 1
    error = one_line_error(capsys)
    assert "nan.npz" in error and "1 non-finite values" in error

    np.savez(tmp_path / "stats.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
    np.savez(tmp_path / "u8.npz", images=digits_uint8())
    assert fid("--gen", str(tmp_path / "u8.npz"), "--ref", str(tmp_path / "stats.npz")) == 1
    error = one_line_error(capsys)
    assert "stats.npz" in error and "mu holds 64 non-finite values" in error

    generated = torch.zeros(4, 1, 8, 8)
    generated[1] = torch.inf
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics(generated, "digits", "digits")


def test_a_truncated_npz_is_named_in_one_line(tmp_path, capsys):
    np.savez(tmp_path / "u8.npz", images=digits_uint8())
    (tmp_path / "cut.npz").write_bytes((tmp_path / "u8.npz").read_bytes()[:500])
    assert fid("--gen", str(tmp_path / "cut.npz"), "--ref", "digits") == 1
    error = one_line_error(capsys)
    assert "cut.npz: unreadable npz" in error


def test_a_diverged_model_gets_a_nan_metric_during_training_not_a_number_from_black_images():
    from fdistill.evaluation.periodic import Evaluator

    def diverged(num, generator):
        return torch.full((num, 1, 8, 8), float("nan"))

    assert np.isnan(Evaluator(num=8, batch_size=4, class_tv=False)(diverged, step=1)["fd_digits"])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_truncated_png_is_named_in_one_line(tmp_path, capsys, workers):
    folder = write_pngs(tmp_path / "gen", digits_uint8(6))
    broken = folder / "0003.png"
    broken.write_bytes(broken.read_bytes()[:60])
    assert fid("--gen", str(folder), "--ref", "digits", "--workers", workers) == 1
    error = one_line_error(capsys)
    assert str(broken) in error and "unreadable image" in error


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_mixed_image_sizes_are_resized_one_by_one(tmp_path):
    images = digits_uint8(40)
    doubled = images.repeat(2, axis=1).repeat(2, axis=2)       # 16x16: area-resampled back to the same 8x8
    mixed = write_pngs(tmp_path / "mixed", images[:20])
    for i, image in enumerate(doubled[20:]):
        Image.fromarray(image.squeeze(-1)).save(mixed / f"{20 + i:04d}.png")
    same = write_pngs(tmp_path / "same", images)
    ours = compute_metrics(str(mixed), "digits", "digits", options=SourceOptions(batch_size=16))
    assert ours["fid"] == pytest.approx(compute_metrics(str(same), "digits", "digits")["fid"], rel=1e-6)

    rng = np.random.default_rng(0)                             # an Inception-style extractor vs clean-fid itself
    real = write_pngs(tmp_path / "real", rng.integers(0, 256, (12, 24, 24, 3), dtype=np.uint8))
    fake = tmp_path / "fake"
    fake.mkdir()
    for i, size in enumerate([16, 24, 20, 31] * 3):
        Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(fake / f"{i:04d}.png")
    extractor = PooledPixelFeatures(pool=2, dim=6)
    expected = cleanfid.compute_fid(str(fake), str(real), mode="clean", custom_feat_extractor=extractor,
                                    num_workers=0, batch_size=5, device=torch.device("cpu"), verbose=False)
    ours = compute_metrics(str(fake), str(real), extractor, options=SourceOptions(batch_size=5), cache=False)
    assert ours["fid"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------ Inception weights


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty cache, an empty temp dir, no environment variable; returns (cache file, temp-dir file)."""
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(inception.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return tmp_path / "cache" / inception.INCEPTION_FILENAME, tmp_path / "tmp" / inception.INCEPTION_FILENAME


def test_published_inception_hash_is_the_one_public_evaluation_code_pins():
    assert inception.INCEPTION_SHA256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


def test_a_cached_inception_file_with_another_hash_is_an_error_that_says_so(no_weights):
    cached, _ = no_weights
    cached.parent.mkdir()
    cached.write_bytes(b"not the published weights")
    with pytest.raises(ValueError, match=r"inception-2015-12-05\.pt: SHA-256 .* is not the published f58cb9b6"
                                         r".*--inception-weights"):
        inception.inception_weights(allow_download=False)


def test_a_file_in_the_temp_dir_is_used_only_when_it_has_the_published_hash(no_weights, monkeypatch):
    cached, shared = no_weights
    shared.write_bytes(b"planted by someone else")
    with pytest.raises(FileNotFoundError, match=r"ignored .*tmp/inception-2015-12-05\.pt: SHA-256"):
        inception.inception_weights(allow_download=False)
    assert not cached.exists()
    monkeypatch.setattr(inception, "INCEPTION_SHA256", hashlib.sha256(shared.read_bytes()).hexdigest())
    weights = inception.inception_weights(allow_download=False)
    assert weights.path == cached and weights.verified                     # a verified copy, not the shared file
    assert cached.read_bytes() == shared.read_bytes()


def test_a_download_with_another_hash_is_refused_and_not_kept(no_weights, monkeypatch):
    cached, _ = no_weights
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    with pytest.raises(ValueError, match="nvlabs-fi-cdn.* is not the published"):
        inception.inception_weights()
    assert not cached.exists() and not list(cached.parent.iterdir())


class StandInInception(torch.nn.Module):
    """The TorchScript interface of inception-2015-12-05.pt: ``layers`` and ``forward(x, return_features)``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x / 255)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inception_weights_given_knowingly_are_used_and_the_file_is_printed(no_weights, tmp_path, capsys):
    torch.jit.script(StandInInception().eval()).save(str(tmp_path / "mine.pt"))
    np.savez(tmp_path / "u8.npz", images=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    assert cli(["fid", "--quiet", "--gen", str(tmp_path / "u8.npz"), "--ref", str(tmp_path / "u8.npz"),
                "--inception-weights", str(tmp_path / "mine.pt"), "--no-cache"]) == 0
    printed = capsys.readouterr()
    assert f"weights {tmp_path / 'mine.pt'} (SHA-256 " in printed.err and "is NOT the published" in printed.err
    assert abs(float(printed.out.split("fid:")[1])) < 1e-3                     # same images: FID 0 up to round-off


# ------------------------------------------------------------------------------------------------ statistics cache


def test_statistics_cache_is_keyed_on_the_clip_weights(tiny_open_clip, tmp_path, monkeypatch):
    import open_clip
    from safetensors.torch import save_file

    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    first, _ = tiny_open_clip
    second = tmp_path / "other" / first.name                     # same model name, so only the weights differ
    second.mkdir(parents=True)
    (second / "open_clip_config.json").write_text((first / "open_clip_config.json").read_text())
    torch.manual_seed(1)                                                      # other weights, same architecture
    save_file(open_clip.create_model(f"local-dir:{second}", load_weights=False).state_dict(),
              str(second / "open_clip_model.safetensors"))
    rng = np.random.default_rng(0)
    real = write_pngs(tmp_path / "real", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    fake = write_pngs(tmp_path / "fake", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))

    def clip_fid(directory, cache: bool) -> float:
        options = {"clip_model": f"local-dir:{directory}", "clip_pretrained": None}
        return compute_metrics(str(fake), str(real), "clip", extractor_options=options, cache=cache)["fid"]

    clip_fid(first, cache=True)
    assert clip_fid(second, cache=True) == pytest.approx(clip_fid(second, cache=False), rel=1e-9)
    assert len(list((tmp_path / "cache" / "stats").glob("real_*.npz"))) == 2
    assert clip_weights_id("ViT-B-32", "openai", torch.nn.Linear(1, 1)) == "open_clip:ViT-B-32:openai"


def test_a_damaged_cache_file_is_recomputed_and_a_failed_cache_write_only_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    folder = write_pngs(tmp_path / "ref", digits_uint8(30))
    expected = compute_metrics(str(folder), str(folder), "digits")["fid"]
    (cached,) = (tmp_path / "cache" / "stats").glob("ref_*.npz")
    cached.write_bytes(b"garbage")
    assert compute_metrics(str(folder), str(folder), "digits")["fid"] == pytest.approx(expected, abs=1e-9)
    cached.unlink()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    assert compute_metrics(str(folder), str(folder), "digits")["fid"] == pytest.approx(expected, abs=1e-9)
    assert "reference statistics not cached" in capsys.readouterr().err


def test_fid_out_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "u8.npz", images=digits_uint8())

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", disk_full)
    assert fid("--gen", str(tmp_path / "u8.npz"), "--ref", "digits", "--out", str(tmp_path / "r.json")) == 1
    error = one_line_error(capsys)
    assert "r.json" in error and "No space left on device" in error


# ------------------------------------------------------------------------------------------------ sample


@pytest.mark.parametrize("args, message", [
    (["--guidance", "nan"], ["--guidance", "finite number", "'nan'"]),
    (["--guidance", "inf"], ["--guidance", "finite number"]),
    (["--steps", "1000000000000"], ["--steps", "at most 1,000"]),
    (["--steps", "1e12"], ["--steps", "at most 1,000", "'1e12'"]),
    (["--num", "0"], ["--num", "positive integer"]),
    (["--num", "1000000000"], ["--num", "at most 10,000,000"]),
])
def test_sample_options_are_validated_with_their_limits(args, message, tmp_path, capsys):
    assert sample("--model", "digits-exact", *args, "--out", str(tmp_path)) == 2
    error = one_line_error(capsys)
    assert all(part in error for part in message), error


def test_nan_samples_are_an_error_not_black_images(tmp_path, capsys):
    net = tiny_unet()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(float("nan"))
    save_denoiser(net, tmp_path / "nan_model")
    assert sample("--model", str(tmp_path / "nan_model"), "--num", "3", "--steps", "2", "--out",
                  str(tmp_path / "out")) == 1
    error = one_line_error(capsys)
    assert "non-finite values" in error and "images 0 .. 2" in error and "--steps 2" in error
    assert not list(tmp_path.glob("out/*.png"))


def test_sample_on_a_full_disk_is_one_line_naming_the_output(tmp_path, monkeypatch, capsys):
    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert sample("--model", "digits-exact", "--num", "2", "--steps", "2", "--out", str(tmp_path / "o")) == 1
    error = one_line_error(capsys)
    assert "cannot write --out" in error and str(tmp_path / "o") in error and "No space left on device" in error


def test_corrupt_or_missing_model_files_are_named(tmp_path, capsys):
    model = save_denoiser(tiny_unet(), tmp_path / "model")
    (model / "fdistill.json").write_text('{"format": 1, "wrapper": ')
    with pytest.raises(ValueError, match=r"model/fdistill\.json: not valid JSON"):
        load_denoiser(model)
    assert sample("--model", str(model), "--out", str(tmp_path / "o")) == 1
    assert f"{model / 'fdistill.json'}: not valid JSON" in one_line_error(capsys)
    (model / "fdistill.json").write_text(json.dumps({"format": 1, "wrapper": "edm"}))
    with pytest.raises(ValueError, match=r"fdistill\.json: missing fields \['model_class'"):
        load_denoiser(model)
    (tmp_path / "empty").mkdir()
    assert sample("--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 1
    assert "is not a model directory" in one_line_error(capsys)
    weights = save_denoiser(tiny_unet(), tmp_path / "no_weights") / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    assert sample("--model", str(tmp_path / "no_weights"), "--out", str(tmp_path / "o")) == 1
    assert "no_weights/unet" in one_line_error(capsys)


def test_dpo_latent_cache_refuses_pickled_objects(tmp_path):
    from fdistill.methods.dpo_cache import cached_dataset

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"latents_w": torch.zeros(1), "payload": Payload()}, tmp_path / "cache.pt")
    with pytest.raises(ValueError, match=r"cache\.pt: not a tensor cache"):
        cached_dataset(None, [0], tmp_path / "cache.pt")
