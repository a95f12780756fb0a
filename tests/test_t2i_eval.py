"""Text-to-image evaluation at scale: prompt files, images written batch by batch, FID of a pipeline on a prompt
file, CLIP score command."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fdistill.cli import main as cli_main
from fdistill.commands import sample as sample_command
from fdistill.evaluation.prompts import read_prompts
from fdistill.images import load_images

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from fdistill.pipelines import save_components
    from fdistill.tiny_sd import tiny_sd_components

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipelines") / "sd"
    save_components(tiny_sd_components("sd15", image_size=8), str(path))
    return path


def write_prompt_files(directory) -> dict[str, str]:
    """The same prompts as txt, json strings, json objects (custom field), jsonl and parquet."""
    files = {"txt": directory / "p.txt", "json": directory / "p.json", "objects": directory / "o.json",
             "jsonl": directory / "p.jsonl", "parquet": directory / "p.parquet"}
    files["txt"].write_text("\n".join(PROMPTS) + "\n\n")
    files["json"].write_text(json.dumps(PROMPTS))
    files["objects"].write_text(json.dumps([{"id": i, "text": p} for i, p in enumerate(PROMPTS)]))
    files["jsonl"].write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
    pq.write_table(pa.table({"id": [1, 2, 3], "caption": PROMPTS}), files["parquet"])
    return {name: str(path) for name, path in files.items()}


def test_read_prompts_in_every_format(tmp_path):
    files = write_prompt_files(tmp_path)
    assert read_prompts(files["txt"]) == PROMPTS
    assert read_prompts(files["json"]) == PROMPTS
    assert read_prompts(files["objects"], caption_column="text") == PROMPTS
    assert read_prompts(files["jsonl"]) == PROMPTS
    assert read_prompts(files["parquet"]) == PROMPTS
    with pytest.raises(ValueError, match="'caption' field"):
        read_prompts(files["objects"])
    with pytest.raises(ValueError, match="no column 'text'.*id, caption"):
        read_prompts(files["parquet"], caption_column="text")
    with pytest.raises(ValueError, match=r"unknown prompt file type '.csv'.*\.txt"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def sample(*args: str) -> int:
    return cli_main(["sample", "--no-progress", *args])


def test_sample_prompts_file_one_image_per_prompt_with_caption_index(sd_dir, tmp_path):
    files = write_prompt_files(tmp_path)
    common = ["--model", str(sd_dir), "--steps", "2", "--guidance", "3"]
    assert sample(*common, "--prompts", files["parquet"], "--per-prompt", "2", "--batch-size", "4",
                  "--out", str(tmp_path / "a")) == 0
    captions = [json.loads(line) for line in (tmp_path / "a" / "captions.jsonl").read_text().splitlines()]
    assert captions == [{"file": f"{i:06d}.png", "caption": PROMPTS[i // 2]} for i in range(6)]
    images = load_images(tmp_path / "a")
    assert images.shape == (6, 3, 8, 8)
    # image 3 (prompt 1, second copy) equals a --prompt run's image 3: prompts follow the index, not the batch
    assert sample(*common, "--prompt", PROMPTS[1], "--num", "4", "--out", str(tmp_path / "b")) == 0
    torch.testing.assert_close(load_images(tmp_path / "b")[3], images[3], atol=2 / 255, rtol=0)
    assert (images[2] - images[0]).abs().max() > 0.01                      # another prompt, another image


@pytest.mark.parametrize("args, message", [
    (["--prompts", "missing.txt"], "--prompts: prompt file missing.txt does not exist"),
    (["--prompts", "PROMPTS", "--num", "3"], "--num and --prompts"),
    (["--prompts", "PROMPTS", "--prompt", "a cat"], "--prompt and --prompts"),
    (["--per-prompt", "2"], "--per-prompt needs --prompts"),
])
def test_sample_prompt_option_errors_exit_2(sd_dir, tmp_path, capsys, args, message):
    files = write_prompt_files(tmp_path)
    args = [files["txt"] if a == "PROMPTS" else a for a in args]
    assert sample("--model", str(sd_dir), *args, "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err


def test_sample_writes_batch_by_batch_keeping_at_most_two_batches_alive(monkeypatch, tmp_path):
    """Images must not accumulate: at every write, at most the current batch (and the one the loop variable still
    holds) of all drawn image tensors is alive, and each write gets one batch."""
    import weakref

    from fdistill import images as images_module

    drawn, writes = weakref.WeakSet(), []
    real_draw, real_save = sample_command.draw, images_module.save_images

    def tracked_draw(*args, **kwargs):
        batch = real_draw(*args, **kwargs)
        drawn.add(batch)
        return batch

    def recorded_save(images, directory, start_index=0):
        writes.append((len(images), sum(len(batch) for batch in drawn)))
        return real_save(images, directory, start_index)

    monkeypatch.setattr(sample_command, "draw", tracked_draw)
    monkeypatch.setattr(images_module, "save_images", recorded_save)
    assert sample("--model", "digits-exact", "--num", "40", "--steps", "1", "--batch-size", "4",
                  "--out", str(tmp_path)) == 0
    assert len(writes) == 10 and max(size for size, _ in writes) == 4
    assert max(alive for _, alive in writes) <= 8
    assert len(list(tmp_path.glob("0*.png"))) == 40 and (tmp_path / "grid.png").is_file()


def test_fid_of_a_pipeline_on_a_prompt_file_equals_fid_of_the_folder_sample_writes(sd_dir, tmp_path):
    """COCO-style FID: `fdistill fid --gen PIPELINE --prompts FILE` draws the images `fdistill sample --prompts`
    writes (same code, same seeds), streamed into the extractor."""
    files = write_prompt_files(tmp_path)
    settings = ["--steps", "2", "--guidance", "3", "--per-prompt", "3", "--batch-size", "4"]
    assert sample("--model", str(sd_dir), "--prompts", files["txt"], "--solver", "dpmpp_2m", *settings,
                  "--out", str(tmp_path / "gen")) == 0
    fid = ["fid", "--ref", "digits", "--features", "digits", "--quiet"]
    assert cli_main([*fid, "--gen", str(tmp_path / "gen"), "--out", str(tmp_path / "folder.json")]) == 0
    assert cli_main([*fid, "--gen", str(sd_dir), "--prompts", files["jsonl"], *settings,
                     "--out", str(tmp_path / "pipeline.json")]) == 0
    folder, pipeline = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("folder", "pipeline"))
    assert pipeline["num_gen"] == folder["num_gen"] == 9
    assert pipeline["fid"] == pytest.approx(folder["fid"], rel=1e-6, abs=1e-6)
    assert pipeline["fid"] > 1                                              # tiny random pipeline: far from digits


def test_fid_prompts_errors_exit_2(sd_dir, tmp_path, capsys):
    files = write_prompt_files(tmp_path)
    assert cli_main(["fid", "--gen", str(sd_dir), "--prompts", files["txt"], "--num", "5", "--ref", "digits",
                     "--features", "digits", "--quiet"]) == 2
    assert "--num and --prompts" in capsys.readouterr().err
    assert cli_main(["fid", "--gen", str(sd_dir), "--prompts", str(tmp_path / "none.txt"), "--ref", "digits",
                     "--features", "digits", "--quiet"]) == 2
    assert "--prompts: prompt file" in capsys.readouterr().err


def test_progress_bars_know_their_total_for_an_eta(tmp_path, capsys):
    """The long loops show n/total (tqdm then prints an ETA): sampling, and features of a folder (no --num)."""
    assert cli_main(["sample", "--model", "digits-exact", "--num", "6", "--steps", "1", "--batch-size", "4",
                     "--out", str(tmp_path)]) == 0
    assert "6/6" in capsys.readouterr().err
    assert cli_main(["fid", "--gen", str(tmp_path), "--ref", str(tmp_path), "--features", "digits",
                     "--no-cache"]) == 0
    bars = capsys.readouterr().err
    assert "reference: 100%|██████████| 6/6" in bars and "generated: 100%|██████████| 6/6" in bars, bars


def test_clipscore_of_a_sampled_folder_its_pipeline_and_a_prompt_file_agree(sd_dir, tiny_open_clip, tmp_path,
                                                                           capsys):
    from fdistill.evaluation.clip import clip_score, load_clip

    directory, _ = tiny_open_clip
    clip_options = ["--clip-model", f"local-dir:{directory}", "--clip-pretrained", "", "--quiet"]
    files = write_prompt_files(tmp_path)
    settings = ["--steps", "2", "--guidance", "3", "--per-prompt", "2", "--batch-size", "4"]
    assert sample("--model", str(sd_dir), "--prompts", files["txt"], *settings, "--out", str(tmp_path / "gen")) == 0

    def score(*args: str) -> float:
        out = tmp_path / "score.json"
        assert cli_main(["clipscore", *args, *clip_options, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["num"] == 6
        return result["clip_score"]

    from_index = score("--images", str(tmp_path / "gen"), "--batch-size", "4")
    expected = clip_score(load_images(tmp_path / "gen"), [p for p in PROMPTS for _ in range(2)],
                          load_clip(f"local-dir:{directory}", None))
    assert from_index == pytest.approx(expected, rel=1e-5)
    assert score("--images", str(tmp_path / "gen"), "--prompts", files["parquet"], "--per-prompt", "2") \
        == pytest.approx(expected, rel=1e-5)
    assert score("--gen", str(sd_dir), "--prompts", files["json"], *settings) == pytest.approx(expected, rel=1e-4)
    # a prompt file of another length, and a folder without captions.jsonl, are refused naming the problem
    assert cli_main(["clipscore", "--images", str(tmp_path / "gen"), "--prompts", files["txt"], *clip_options]) == 2
    assert "3 prompts x --per-prompt 1 != 6 images" in capsys.readouterr().err
    (tmp_path / "gen" / "captions.jsonl").unlink()
    assert cli_main(["clipscore", "--images", str(tmp_path / "gen"), *clip_options]) == 1
    assert "captions.jsonl does not exist; give the prompts with --prompts" in capsys.readouterr().err


def test_sample_under_accelerate_launch_two_cpu_processes_writes_the_one_process_images(sd_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU, GPUs hidden): each process draws every
    other batch; together they write the one-process files (PNGs within one grey level, identical captions)."""
    import os
    import socket
    import subprocess
    import sys

    files = write_prompt_files(tmp_path)
    settings = ["--model", str(sd_dir), "--prompts", files["txt"], "--per-prompt", "3", "--steps", "2",
                "--guidance", "3", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert sample(*settings[:-1], "--out", str(tmp_path / "one")) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "fdistill.cli", "sample", *settings, "--out", str(tmp_path / "two")]
    two = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote 9 images") == 1                         # the main process reports, once
    one_images, two_images = load_images(tmp_path / "one"), load_images(tmp_path / "two")
    assert two_images.shape == one_images.shape == (9, 3, 8, 8)
    assert (two_images - one_images).abs().max() <= 1.5 / 127.5
    assert (tmp_path / "two" / "captions.jsonl").read_text() == (tmp_path / "one" / "captions.jsonl").read_text()
    assert (tmp_path / "two" / "grid.png").is_file()


def test_processes_draw_disjoint_strided_batches_that_cover_every_image():
    args = sample_command.build_parser().parse_args(["--model", "digits-exact", "--num", "11", "--batch-size", "2",
                                                     "--steps", "1", "--no-progress", "--out", "unused"])
    model, denoiser, levels = sample_command.prepare(args)
    everything = dict(sample_command.image_batches(model, denoiser, args, levels))
    shares = [dict(sample_command.image_batches(model, denoiser, args, levels, rank, 3)) for rank in range(3)]
    assert [sorted(share) for share in shares] == [[0, 6], [2, 8], [4, 10]]
    for share in shares:
        for start, images in share.items():
            torch.testing.assert_close(images, everything[start])
