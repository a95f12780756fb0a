"""``fdistill sample`` end to end on tiny model directories and the built-in digits-exact model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.cli import main as cli_main
from fdistill.commands.sample import image_noise
from fdistill.data.builtin import digits_images
from fdistill.denoisers import save_denoiser
from fdistill.images import load_images, to_uint8
from fdistill.networks import MLPDenoiser, tiny_unet


def sample(*args: str) -> int:
    return cli_main(["sample", "--no-progress", *args])


def png_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_denoiser(tiny_unet(num_classes=3), path)
    return path


def test_model_directory_end_to_end_seed_and_batch_size_invariance(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--num", "5", "--steps", "3", "--solver", "dpmpp_2m"]
    assert sample(*common, "--batch-size", "2", "--out", str(tmp_path / "a")) == 0
    files = png_bytes(tmp_path / "a")
    assert sorted(files) == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]
    assert sample(*common, "--batch-size", "2", "--out", str(tmp_path / "b")) == 0
    assert png_bytes(tmp_path / "b") == files                                # same seed -> identical files
    assert sample(*common, "--batch-size", "5", "--out", str(tmp_path / "c")) == 0
    assert png_bytes(tmp_path / "c") == files                                # batch size does not matter
    assert sample(*common, "--seed", "7", "--out", str(tmp_path / "d")) == 0
    assert png_bytes(tmp_path / "d")["000000.png"] != files["000000.png"]


def test_digits_exact_lands_on_training_digits_of_the_requested_class(tmp_path):
    assert sample("--model", "digits-exact", "--num", "4", "--steps", "8", "--class", "7",
                  "--out", str(tmp_path)) == 0
    images = load_images(tmp_path)
    assert images.shape == (4, 1, 8, 8)
    data, labels = digits_images(8)
    distance = (images[:, None] - data[None]).abs().amax(dim=(2, 3, 4))      # [4, 1797]
    nearest = distance.argmin(dim=1)
    assert (distance.min(dim=1).values < 0.02).all() and (labels[nearest] == 7).all()


def test_generator_directory_is_one_step(tmp_path):
    generator = tiny_unet()
    save_denoiser(generator, tmp_path / "gen", kind="generator", generator_sigma=2.0)
    assert sample("--model", str(tmp_path / "gen"), "--num", "3", "--seed", "4", "--out", str(tmp_path / "out")) == 0
    z = image_noise(4, 0, 3, (1, 8, 8))
    with torch.no_grad():
        expected = to_uint8(generator(2.0 * z, torch.full((3,), 2.0)))
    written = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png")) for i in range(3)])
    assert np.abs(written.astype(int) - expected[..., 0].astype(int)).max() <= 1


def test_point_model_writes_samples_npy(tmp_path):
    save_denoiser(MLPDenoiser(dim=2, hidden=8, depth=1), tmp_path / "mlp")
    assert sample("--model", str(tmp_path / "mlp"), "--num", "6", "--steps", "2", "--out", str(tmp_path / "o")) == 0
    assert np.load(tmp_path / "o" / "samples.npy").shape == (6, 2)


def test_text_pipeline_with_prompt_and_guidance(tmp_path):
    from fdistill.pipelines import save_components
    from fdistill.tiny_sd import tiny_sd_components

    save_components(tiny_sd_components("sd15", image_size=8), str(tmp_path / "sd"))
    assert sample("--model", str(tmp_path / "sd"), "--num", "2", "--steps", "2", "--prompt", "a red square",
                  "--guidance", "4", "--out", str(tmp_path / "o")) == 0
    assert load_images(tmp_path / "o").shape == (2, 3, 8, 8)                 # decoded by the VAE, RGB


@pytest.mark.parametrize("args, message", [
    (["--model", "digits-exact", "--solver", "rk45"], ["invalid choice: 'rk45'", "dpmpp_2m", "dpm_solver_1"]),
    (["--model", "/no/such/model"], ["/no/such/model", "does not exist", "digits-exact"]),
    (["--model", "digits-exact", "--steps", "-3"], ["--steps", "positive integer", "'-3'"]),
    (["--model", "digits-exact", "--class", "12"], ["--class 12", "allowed 0 .. 9"]),
    (["--model", "digits-exact", "--schedule", "cosine"], ["invalid choice: 'cosine'", "karras", "logsnr"]),
])
def test_bad_input_exits_2_naming_the_problem(args, message, tmp_path, capsys):
    assert sample(*args, "--num", "2", "--out", str(tmp_path)) == 2
    error = capsys.readouterr().err
    assert all(part in error for part in message), error
    assert "Traceback" not in error


def test_model_specific_option_errors(model_dir, tmp_path, capsys):
    save_denoiser(tiny_unet(), tmp_path / "gen", kind="generator", generator_sigma=2.0)
    assert sample("--model", str(tmp_path / "gen"), "--steps", "4", "--out", str(tmp_path / "o")) == 2
    assert "1-step generator; allowed: --steps 1" in capsys.readouterr().err
    save_denoiser(tiny_unet(), tmp_path / "uncond")
    assert sample("--model", str(tmp_path / "uncond"), "--guidance", "2", "--out", str(tmp_path / "o")) == 2
    assert "--guidance needs a conditional model" in capsys.readouterr().err
    assert sample("--model", str(model_dir), "--prompt", "a cat", "--out", str(tmp_path / "o")) == 2
    assert "not a text-conditioned model" in capsys.readouterr().err
