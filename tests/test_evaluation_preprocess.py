"""clean-fid preprocessing, Inception weight lookup, named statistics, CLIP (tiny random open_clip model)."""

import hashlib

import numpy as np
import pytest
import torch
from cleanfid.resize import build_resizer

from fdistill.evaluation import clean_resize, clean_resize_pil, quantize_to_uint8
from fdistill.evaluation import inception
from fdistill.evaluation.clip import clip_score, load_clip
from fdistill.evaluation.extractors import build_feature_extractor
from fdistill.evaluation.fid import named_statistics_path, reference_statistics


@pytest.mark.parametrize("height,width", [(32, 32), (20, 27), (400, 350)])
def test_batched_clean_resize_equals_cleanfid_resize(height, width):
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    cleanfid_resize = build_resizer("clean")
    expected = np.stack([cleanfid_resize(image.permute(1, 2, 0).numpy()) for image in images]).transpose(0, 3, 1, 2)
    ours = clean_resize(images).numpy()
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-3)          # values in [0, 255]
    np.testing.assert_array_equal(clean_resize_pil(images[0].permute(1, 2, 0).numpy()), expected[0].transpose(1, 2, 0))


def test_quantize_matches_png_export_convention():
    x = torch.tensor([-1.0, -0.99, 0.0, 0.5, 1.0, 1.2])
    assert quantize_to_uint8(x).tolist() == [0, 1, 128, 191, 255, 255]


def test_missing_inception_weights_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception.tempfile, "gettempdir", lambda: str(tmp_path))

    def offline(url, destination, timeout=60.0, sha256=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(inception, "download", offline)
    with pytest.raises(FileNotFoundError) as error:
        build_feature_extractor("inception")
    message = str(error.value)
    hints = ("--inception-weights", "FDISTILL_INCEPTION_WEIGHTS", inception.INCEPTION_URL, "network is unreachable")
    for hint in hints:
        assert hint in message
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt.*FDISTILL_INCEPTION_WEIGHTS.*does not exist"):
        inception.inception_weights()


def test_inception_weights_found_in_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path))
    (tmp_path / inception.INCEPTION_FILENAME).write_bytes(b"x")
    monkeypatch.setattr(inception, "INCEPTION_SHA256", hashlib.sha256(b"x").hexdigest())   # stands for the real file
    weights = inception.inception_weights(allow_download=False)
    assert weights.path == tmp_path / inception.INCEPTION_FILENAME and weights.verified


def test_named_statistics_are_read_locally_or_the_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cifar10_clean_train_32\.npz.*put the file in"):
        named_statistics_path("cifar10/train/32", "clean", "inception", allow_download=False)
    (tmp_path / "stats").mkdir()
    np.savez(tmp_path / "stats" / "cifar10_clean_train_32.npz", mu=np.ones(3), sigma=np.eye(3))
    extractor = build_feature_extractor("digits")
    extractor.name = "inception"                       # only the file name depends on it
    stats = reference_statistics("cifar10/train/32", extractor, "clean")
    np.testing.assert_array_equal(stats.mu, np.ones(3))
    with pytest.raises(ValueError, match="name/split/res"):
        named_statistics_path("cifar10/train", "clean", "inception")


@pytest.fixture(scope="module")
def tiny_clip_dir(tiny_open_clip):
    return tiny_open_clip


def test_clip_loads_local_weights_and_scores_like_the_formula(tiny_clip_dir):
    directory, saved = tiny_clip_dir
    clip = load_clip(f"local-dir:{directory}", None)
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in saved.items())
    assert clip.image_size == 32 and clip.mean == (0.5, 0.5, 0.5)
    images, captions = torch.rand(3, 3, 40, 48) * 2 - 1, ["a cat", "a red square", "two dogs"]
    cosine = (clip.image_embeddings(images) * clip.text_embeddings(captions)).sum(-1)
    assert clip_score(images, captions, clip, batch_size=2) == pytest.approx(float((100 * cosine.clamp_min(0)).mean()))
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(images, captions[:2], clip)
    extractor = build_feature_extractor("clip", clip_model=f"local-dir:{directory}", clip_pretrained=None)
    features = extractor.features(extractor.preprocess(quantize_to_uint8(images)))
    assert features.shape == (3, 16)


class StandInInception(torch.nn.Module):
    """Same TorchScript interface as inception-2015-12-05.pt: ``layers`` and ``forward(x, return_features)``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x / 255)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inception_extractor_loads_torchscript_from_env_and_applies_cleanfid_normalisation(tmp_path, monkeypatch):
    stand_in = StandInInception().eval()
    torch.jit.script(stand_in).save(str(tmp_path / "inception.pt"))
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "inception.pt"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    clean = build_feature_extractor("inception", mode="clean")
    features = clean.features(clean.preprocess(images))
    expected = stand_in.layers((clean_resize(images) - 128) / 128)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    legacy = build_feature_extractor("inception", mode="legacy_tensorflow")
    torch.testing.assert_close(legacy.features(legacy.preprocess(images)), stand_in(images.float()))
