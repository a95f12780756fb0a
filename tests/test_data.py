"""Data sources: image folders, Hugging Face datasets, digits resizing (offline, generated files)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data import BadImageError, digits, hf_images, image_folder


def write_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def constant_rgb(value: int, height: int = 12, width: int = 16) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


@pytest.fixture
def folder(tmp_path):
    """cat/ (2 images), dog/ (1 image + 1 nested), a corrupt cat/zz_bad.png and a non-image text file."""
    root = tmp_path / "images"
    write_image(root / "cat" / "a.png", constant_rgb(0))
    write_image(root / "cat" / "b.jpg", constant_rgb(255))
    write_image(root / "dog" / "c.bmp", constant_rgb(51))
    write_image(root / "dog" / "deep" / "d.webp", constant_rgb(204))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


def test_folder_order_labels_range_and_shape(folder):
    (folder / "cat" / "zz_bad.png").unlink()
    source = image_folder(folder, resolution=8, channels=3, labels=True)
    assert source.sample_shape == (3, 8, 8) and source.num_classes == 2
    assert [p.relative_to(folder).as_posix() for p in source.dataset.paths] == \
        ["cat/a.png", "cat/b.jpg", "dog/c.bmp", "dog/deep/d.webp"]
    assert source.extras["class_names"] == ["cat", "dog"]
    items = [source.dataset[i] for i in range(len(source.dataset))]
    assert [int(item["label"]) for item in items] == [0, 0, 1, 1]
    assert all(item["x"].shape == (3, 8, 8) and item["x"].dtype == torch.float32 for item in items)
    # uint8 v maps to v / 127.5 - 1 (png / bmp lossless; jpeg and webp within compression error)
    assert torch.allclose(items[0]["x"], torch.full((3, 8, 8), -1.0))
    assert torch.allclose(items[2]["x"], torch.full((3, 8, 8), 51 / 127.5 - 1))
    assert (items[1]["x"] - 1).abs().max() < 0.02 and (items[3]["x"] - (204 / 127.5 - 1)).abs().max() < 0.05
    batch = next(source.loader(batch_size=4, seed=0))
    assert batch["x"].shape == (4, 3, 8, 8) and batch["label"].dtype == torch.long


def test_corrupt_file_raises_naming_it_or_is_skipped_and_counted(folder, caplog):
    strict = image_folder(folder, resolution=8)
    assert len(strict.dataset) == 5 and strict.num_classes == 0 and "label" not in strict.dataset[0]
    with pytest.raises(BadImageError, match="zz_bad.png"):
        strict.dataset[2]  # sorted: cat/a, cat/b, cat/zz_bad, dog/c, dog/deep/d
    with caplog.at_level(logging.WARNING, logger="fdistill.data.images"):
        lenient = image_folder(folder, resolution=8, skip_bad=True)
    assert lenient.dataset.skipped == 1 and lenient.dataset.skipped_files[0].endswith("zz_bad.png")
    assert "skipped 1 unreadable" in caplog.text
    assert len(lenient.dataset) == 4
    assert all(lenient.dataset[i]["x"].shape == (3, 8, 8) for i in range(4))


def test_resize_center_crop_and_grayscale(tmp_path):
    """A 4x8 image (left half black, right half white) -> 4x4: the center crop keeps columns 2..5 -> 2 black, 2 white."""
    pixels = np.zeros((4, 8), np.uint8)
    pixels[:, 4:] = 255
    write_image(tmp_path / "x.png", np.stack([pixels] * 3, axis=-1))
    x = image_folder(tmp_path, resolution=4, channels=1).dataset[0]["x"]
    assert x.shape == (1, 4, 4)
    expected = torch.tensor([-1.0, -1.0, 1.0, 1.0]).expand(1, 4, 4)
    assert torch.allclose(x, expected)
    # downscaling 8x16 -> 4x4 halves both sides before cropping: rows stay constant, columns 4..11 of 16 kept
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 8:] = 255
    write_image(tmp_path / "wide" / "y.png", wide)
    y = image_folder(tmp_path / "wide", resolution=4, channels=1).dataset[0]["x"][0]
    assert torch.allclose(y, y[:1].expand(4, 4)) and y[0, 0] < -0.9 and y[0, 3] > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 2}, "data.channels"), ({"resolution": 0}, "data.resolution")])
def test_folder_bad_options_name_the_field(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        image_folder(folder, **kwargs)


def test_folder_missing_empty_and_loose_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no readable image"):
        image_folder(tmp_path)
    write_image(tmp_path / "loose.png", constant_rgb(10))
    with pytest.raises(ValueError, match="loose.png"):
        image_folder(tmp_path, labels=True)


def png_bytes(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_table(corrupt: bool):
    import datasets

    images = [png_bytes(v) for v in (0, 255, 102)] + ([b"garbage"] if corrupt else [])
    labels = [2, 0, 1] + ([1] if corrupt else [])
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in images], "y": labels},
                                      features=features)


def test_hf_save_to_disk_with_labels(tmp_path):
    hf_table(corrupt=False).save_to_disk(str(tmp_path / "saved"))
    source = hf_images(str(tmp_path / "saved"), image_column="img", label_column="y", resolution=4, channels=1)
    assert source.sample_shape == (1, 4, 4) and source.num_classes == 3 and len(source.dataset) == 3
    item = source.dataset[2]
    assert torch.allclose(item["x"], torch.full((1, 4, 4), 102 / 127.5 - 1)) and int(item["label"]) == 1
    assert torch.allclose(source.dataset[1]["x"], torch.ones(1, 4, 4))


def test_hf_parquet_bad_row_named_or_skipped(tmp_path):
    hf_table(corrupt=True).to_parquet(str(tmp_path / "train.parquet"))
    files = str(tmp_path / "train.parquet")
    strict = hf_images("parquet", data_files=files, image_column="img", label_column="y", resolution=4)
    assert len(strict.dataset) == 4 and strict.dataset[0]["x"].shape == (3, 4, 4)
    with pytest.raises(BadImageError, match=r"row 3"):
        strict.dataset[3]
    lenient = hf_images("parquet", data_files=files, image_column="img", label_column="y", resolution=4, skip_bad=True)
    assert lenient.dataset.skipped == 1 and len(lenient.dataset) == 3
    assert [int(lenient.dataset[i]["label"]) for i in range(3)] == [2, 0, 1]
    with pytest.raises(ValueError, match="data.image_column='image'"):
        hf_images("parquet", data_files=files)


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_resize(resolution):
    native, resized = digits(8), digits(resolution)
    assert resized.sample_shape == (1, resolution, resolution) and len(resized.dataset) == 1797
    x = torch.stack([resized.dataset[i]["x"] for i in range(5)])
    assert x.min() >= -1 and x.max() <= 1
    # the documented resize: bilinear (align_corners=False) of the native 8x8 images, same labels and order
    native_x = torch.stack([native.dataset[i]["x"] for i in range(5)])
    expected = torch.nn.functional.interpolate(native_x, size=resolution, mode="bilinear", align_corners=False)
    assert torch.allclose(x, expected.clamp(-1, 1))
    assert all(int(resized.dataset[i]["label"]) == int(native.dataset[i]["label"]) for i in range(5))
    with pytest.raises(ValueError, match="resolution"):
        digits(12)


def test_hydra_data_configs_instantiate(folder):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fdistill.config import config_dir

    cfg = OmegaConf.load(config_dir() / "data" / "image_folder.yaml")
    cfg.root, cfg.skip_bad, cfg.labels, cfg.resolution = str(folder), True, True, 8
    source = instantiate(cfg)
    assert len(source.dataset) == 4 and source.num_classes == 2 and source.dataset.skipped == 1
    hf_cfg = OmegaConf.load(config_dir() / "data" / "hf_images.yaml")
    assert hf_cfg._target_ == "fdistill.data.hf_images" and OmegaConf.is_missing(hf_cfg, "path")
