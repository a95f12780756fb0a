"""Sharing an export: the model card every export carries, ``fdistill push`` and ``train.push_to_hub`` (against an
in-process stand-in of ``huggingface_hub.HfApi``: no network)."""
import json

import pytest
import yaml

from fdistill.training.config import TrainConfig
from fdistill.training.hub import command_line, write_model_card

GMM = ["experiment=gmm_fdistill", "method.network.hidden=16", "data.num_samples=64", "train.steps=2",
       "train.batch_size=16", "train.progress=false", "train.checkpoint_every=2"]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the two HfApi calls fdistill makes; record the repo and the files present at upload time."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kwargs):
        calls["create"] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type,
                               token=self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, **kwargs):
        from pathlib import Path

        root = Path(folder_path)
        calls["upload"] = dict(repo_id=repo_id, repo_type=repo_type, folder=root,
                               files=sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
                               card=(root / "README.md").read_text())

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_train_exports_a_model_card_and_pushes_it(tmp_path, fake_hub, monkeypatch):
    from fdistill.commands.train import main

    run_dir = tmp_path / "run"
    argv = ["fdistill", "train", *GMM, f"train.run_dir={run_dir}", "train.push_to_hub=true",
            "train.hub_repo_id=me/gmm-one-step"]
    monkeypatch.setattr("sys.argv", argv)
    assert main(argv[2:]) == 0
    card = (run_dir / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and {"fdistill", "f-divergence-js"} <= set(meta["tags"])
    assert "base_model" not in meta                                    # the teacher is the exact GMM denoiser
    assert card.startswith("---") and "# f-distill generator (fdistill)" in card and "`method.generator_sigmas`" not in card
    assert "- **Divergence**: js" in card and "- **Student sampling steps**: 1" in card
    assert "| `method.lr` | `0.001` |" in card and "| `train.steps` | `2` |" in card
    assert "train.hub_repo_id=me/gmm-one-step" in card and card.count("fdistill train experiment=gmm_fdistill") == 1
    assert fake_hub["create"] == dict(repo_id="me/gmm-one-step", private=False, exist_ok=True, repo_type="model",
                                      token=None)
    upload = fake_hub["upload"]
    assert upload["repo_id"] == "me/gmm-one-step" and upload["folder"] == run_dir / "model"
    assert {"README.md", "fdistill.json"} <= set(upload["files"])
    assert any(f.endswith(".safetensors") for f in upload["files"]) and upload["card"] == card


def test_push_command_uploads_the_export(tmp_path, fake_hub):
    from fdistill.cli import main
    from fdistill.commands.train import main as train

    run_dir = tmp_path / "run"
    assert train([*GMM, f"train.run_dir={run_dir}"]) == 0
    (run_dir / "model" / "README.md").unlink()                        # an export from before model cards
    assert main(["push", str(run_dir), "--repo-id", "me/gmm", "--private", "--token", "hf_test"]) == 0
    assert fake_hub["create"] == dict(repo_id="me/gmm", private=True, exist_ok=True, repo_type="model",
                                      token="hf_test")
    assert "README.md" in fake_hub["upload"]["files"] and "(not recorded" in fake_hub["upload"]["card"]


def test_push_command_rejects_bad_input(tmp_path, fake_hub, capsys):
    from fdistill.cli import main

    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "model: no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path), "--repo-id", "not a repo"])
    assert exit_info.value.code == 2 and "OWNER/NAME" in capsys.readouterr().err
    assert not fake_hub


def test_push_to_hub_needs_a_repo_id():
    with pytest.raises(ValueError, match="train.push_to_hub needs train.export=true and train.hub_repo_id"):
        TrainConfig(push_to_hub=True)
    with pytest.raises(ValueError, match="train.hub_repo_id"):
        TrainConfig(push_to_hub=True, hub_repo_id="me/x", export=False)


def test_card_names_base_model_license_and_last_evaluation(tmp_path):
    run_dir, export = tmp_path / "run", tmp_path / "run" / "model"
    export.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "method": {"name": "diffusion_dpo", "beta": 2000.0, "finetune": "lora", "lora_rank": 8},
        "model": {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "train": {"steps": 1000}}))
    rows = [{"step": 500, "loss": 0.6, "eval/fid": 30.0}, {"step": 1000, "eval/fid": 21.5, "eval/clip": 0.31},
            {"step": 1001, "loss": 0.5}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (export / "fdistill_dpo.json").write_text(json.dumps({"finetune": "lora", "base_model": None}))
    card = write_model_card(export, run_dir, argv=["/venv/bin/fdistill", "train", "experiment=dpo_sd15"]).read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m" and {"lora", "text-to-image"} <= set(meta["tags"])
    assert "Last evaluation (step 1000)" in card and "| fid | 21.5 |" in card and "| clip | 0.31 |" in card
    assert "| fid | 30 |" not in card and "Divergence" not in card
    assert "fdistill train experiment=dpo_sd15" in card


def test_card_of_a_local_base_keeps_it_out_of_the_front_matter(tmp_path):
    export = tmp_path / "model"
    export.mkdir()
    (export / "fdistill_dpo.json").write_text(json.dumps({"finetune": "lora", "base_model": str(tmp_path)}))
    card = write_model_card(export, tmp_path, argv=["x"]).read_text()
    assert "base_model" not in front_matter(card) and f"- **Base model**: {tmp_path}" in card
    assert "No evaluation was run" in card


def test_command_line_shows_the_entry_point_as_fdistill():
    assert command_line(["/usr/lib/python3/site-packages/fdistill/cli.py", "train", "method.lr=1e-3",
                         "train.run_dir=my runs/a"]) == "fdistill train method.lr=1e-3 'train.run_dir=my runs/a'"


def test_a_failed_upload_is_one_line_with_the_retry_command(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from fdistill.cli import main
    from fdistill.commands.train import main as train

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve huggingface.co")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    run_dir = tmp_path / "run"
    assert train([*GMM, f"train.run_dir={run_dir}", "train.push_to_hub=true", "train.hub_repo_id=me/gmm"]) == 0
    err = capsys.readouterr().err
    assert "to the Hub repository me/gmm failed: ConnectionError: Failed to resolve" in err
    assert f"retry with: fdistill push {run_dir} --repo-id me/gmm" in err
    assert main(["push", str(run_dir), "--repo-id", "me/gmm"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
