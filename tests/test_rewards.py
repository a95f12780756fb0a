"""Reward scorers (fdistill.evaluation.rewards) on tiny random CLIP models, and the Diffusion-DPO reward evaluation
(fdistill.benchmarks.dpo_eval, behind scripts/eval_dpo.py) end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

from fdistill.benchmarks import dpo_eval
from fdistill.evaluation.clip import clip_preprocess, clip_score, load_clip
from fdistill.evaluation.preprocess import quantize_to_uint8
from fdistill.evaluation.rewards import SCORERS, build_scorer, resolve_weights_file, win_rate
from fdistill.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from fdistill.methods.dpo_eval import sample_rewards
from fdistill.pipelines import save_components
from fdistill.tiny_sd import tiny_clip_tokenizer, tiny_sd_components
from fdistill.training.config import SamplerConfig

SAMPLER = SamplerConfig(solver="dpmpp_2m", steps=2, guidance=1.0)
PROMPTS = ["a red square", "the blue circle on a dark background", "green cross"]


@pytest.fixture(scope="module")
def open_clip_dir(tiny_open_clip):
    return tiny_open_clip[0]


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory = tmp_path_factory.mktemp("pickscore")
    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_hidden_layers=1, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0))
    model.save_pretrained(directory)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def images_of(seed: int, count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, 24, 20, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pickscore_is_logit_scale_times_cosine_per_image(pickscore_dir):
    from transformers import AutoProcessor, CLIPModel

    score = build_scorer("pickscore", str(pickscore_dir), str(pickscore_dir))
    images = images_of(0)
    scores = score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(score(images, PROMPTS), scores, rtol=0, atol=0)       # deterministic
    model, processor = CLIPModel.from_pretrained(pickscore_dir).eval(), AutoProcessor.from_pretrained(pickscore_dir)
    pixels = [image.permute(1, 2, 0).numpy() for image in quantize_to_uint8(images)]
    inputs = processor(images=pixels, text=PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embed = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embed = model.get_text_features(input_ids=inputs["input_ids"],
                                             attention_mask=inputs["attention_mask"]).pooler_output
    cosine = (F.normalize(image_embed, dim=-1) * F.normalize(text_embed, dim=-1)).sum(-1)
    torch.testing.assert_close(scores, torch.exp(torch.tensor(3.0)) * cosine, rtol=1e-5, atol=1e-5)
    batched = SCORERS["pickscore"](str(pickscore_dir), str(pickscore_dir), batch_size=2)(images, PROMPTS)
    torch.testing.assert_close(batched, scores, rtol=1e-5, atol=1e-5)              # batching does not matter
    assert not torch.allclose(score(images, PROMPTS[::-1]), scores)                 # the prompt enters the score


def test_clip_reward_is_per_image_clip_score(open_clip_dir):
    score = build_scorer("clip", f"local-dir:{open_clip_dir}")
    images = images_of(1)
    scores = score(images, PROMPTS)
    clip = load_clip(f"local-dir:{open_clip_dir}", None)
    cosine = (clip.image_embeddings(images) * clip.text_embeddings(PROMPTS)).sum(-1)
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), rtol=1e-5, atol=1e-4)
    assert scores.mean().item() == pytest.approx(clip_score(images, PROMPTS, clip), rel=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        score(images, PROMPTS[:2])


def tiny_open_clip_weights(directory, seed: int) -> dict:
    """A freshly initialised state dict of the tiny open_clip architecture in ``directory`` (not its saved weights)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(f"local-dir:{directory}", load_weights=False).state_dict()


def test_hpsv2_is_100_cosine_of_the_checkpoint_weights(open_clip_dir, tmp_path):
    import open_clip

    state_dict = tiny_open_clip_weights(open_clip_dir, seed=1)
    torch.save({"state_dict": {f"module.{key}": value for key, value in state_dict.items()}}, tmp_path / "hps.pt")
    score = build_scorer("hpsv2", str(tmp_path / "hps.pt"), f"local-dir:{open_clip_dir}")
    images = images_of(2)
    scores = score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    model = open_clip.create_model(f"local-dir:{open_clip_dir}", load_weights=False).eval()   # computed by hand
    model.load_state_dict(state_dict)
    pixels = clip_preprocess(quantize_to_uint8(images), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tokens = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")(PROMPTS)
    with torch.no_grad():
        cosine = (F.normalize(model.encode_image(pixels), dim=-1) *
                  F.normalize(model.encode_text(tokens), dim=-1)).sum(-1)
    torch.testing.assert_close(scores, 100 * cosine, rtol=1e-5, atol=1e-4)
    assert (scores < 0).any()             # not clamped like the CLIP score (random weights give negative cosines)
    # the checkpoint replaced the folder's own weights
    assert not torch.allclose(scores, build_scorer("clip", f"local-dir:{open_clip_dir}")(images, PROMPTS), atol=1e-2)
    torch.save(state_dict, tmp_path / "bare.pt")                     # a bare state dict without "module." loads too
    bare = SCORERS["hpsv2"](str(tmp_path / "bare.pt"), f"local-dir:{open_clip_dir}", batch_size=2)(images, PROMPTS)
    torch.testing.assert_close(bare, scores, rtol=1e-5, atol=1e-4)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"HPSv2 checkpoint .*other.pt' does not fit the open_clip architecture"):
        build_scorer("hpsv2", str(tmp_path / "other.pt"), f"local-dir:{open_clip_dir}")


def aesthetic_layout(width: int) -> torch.nn.Sequential:
    """The released predictor's layer layout (Linear/Dropout at indices 0..7), written out independently."""
    return torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


def test_aesthetic_is_the_head_on_the_normalised_image_embedding(open_clip_dir, tmp_path):
    torch.manual_seed(0)
    head = aesthetic_layout(16)                                       # the tiny CLIP embeds in 16 dimensions
    torch.save({f"layers.{key}": value for key, value in head.state_dict().items()}, tmp_path / "head.pth")
    score = build_scorer("aesthetic", str(tmp_path / "head.pth"), f"local-dir:{open_clip_dir}")
    images = images_of(3)
    scores = score(images, PROMPTS)
    clip = load_clip(f"local-dir:{open_clip_dir}", None)
    embeddings = clip.model.encode_image(clip_preprocess(quantize_to_uint8(images), 32, (0.5,) * 3, (0.5,) * 3))
    with torch.no_grad():
        expected = head(F.normalize(embeddings, dim=-1)).squeeze(-1)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0                                                              # images differ in score
    torch.testing.assert_close(score(images, ["x", "y", "z"]), scores, rtol=0, atol=0)   # prompts are ignored
    torch.save({f"layers.{key}": value for key, value in aesthetic_layout(768).state_dict().items()},
               tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but the CLIP 'local-dir:.*' .* gives 16-d"):
        build_scorer("aesthetic", str(tmp_path / "wide.pth"), f"local-dir:{open_clip_dir}")
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"'.*partial.pth' does not have the layer layout of AestheticHead"):
        build_scorer("aesthetic", str(tmp_path / "partial.pth"), f"local-dir:{open_clip_dir}")


def test_weights_files_resolve_to_local_paths_or_hub_files(tmp_path, monkeypatch):
    import huggingface_hub

    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: downloads.append((repo, name)) or name)
    (tmp_path / "local.pt").write_bytes(b"")
    assert resolve_weights_file(str(tmp_path / "local.pt"), "org/default", "default.pt") == str(tmp_path / "local.pt")
    resolve_weights_file(None, "xswu/HPSv2", "HPS_v2_compressed.pt")
    resolve_weights_file("HPS_v2.1_compressed.pt", "xswu/HPSv2", "HPS_v2_compressed.pt")
    resolve_weights_file("org/repo/sub/file.pth", "xswu/HPSv2", "HPS_v2_compressed.pt")
    assert downloads == [("xswu/HPSv2", "HPS_v2_compressed.pt"), ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
                         ("org/repo", "sub/file.pth")]
    for local in (str(tmp_path / "missing.pt"), "./missing.pt", "dir/missing.pt"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            resolve_weights_file(local, "xswu/HPSv2", "HPS_v2_compressed.pt")
    assert len(downloads) == 3                                         # a local-looking path never goes to the hub


def test_registry_lists_the_four_scorers_and_eval_dpo_accepts_them():
    assert sorted(SCORERS) == ["aesthetic", "clip", "hpsv2", "pickscore"]
    for name in SCORERS:
        assert dpo_eval.parse_args(["--base", "b", "--tuned", "t", "--prompts", "p", "--scorer", name]).scorer == name


def test_scorer_errors_name_the_model_and_the_local_path_option(tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward scorer 'hps'.*'aesthetic', 'clip', 'hpsv2', 'pickscore'"):
        build_scorer("hps")
    with pytest.raises(OSError, match=r"HPSv2 checkpoint '.*HPS_v2.pt' \(FileNotFoundError.*local path as "
                                      r"model='/path/to/HPS_v2_compressed.pt' \(--scorer-model\)"):
        build_scorer("hpsv2", str(tmp_path / "HPS_v2.pt"))
    with pytest.raises(OSError, match=r"aesthetic predictor head '.*head.pth'.*local path as model="):
        build_scorer("aesthetic", str(tmp_path / "head.pth"))
    missing = str(tmp_path / "PickScore_v1")
    with pytest.raises(OSError, match=r"PickScore model '.*PickScore_v1'.*local path as model="):
        build_scorer("pickscore", missing)
    with pytest.raises(OSError, match=r"open_clip model 'local-dir:.*nowhere.*local-dir:/path"):
        build_scorer("clip", f"local-dir:{tmp_path / 'nowhere'}")


def test_win_rate_counts_ties_as_half():
    assert win_rate(torch.tensor([2.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, -1.0])) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="paired scores"):
        win_rate(torch.zeros(3), torch.zeros(2))


def lora_dpo_method(rank: int = 2):
    """A LoRA DiffusionDPO on the tiny SD with nonzero adapters (a stand-in for a trained run)."""
    method = DiffusionDPO(DiffusionDPOConfig(finetune="lora", lora_rank=rank, lora_alpha=8.0, sampler=SAMPLER),
                          tiny_sd_components(image_size=8), (8, 8))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in method.networks["unet"].named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    return method


def test_eval_dpo_script_scores_base_and_tuned_on_the_same_noise(tmp_path, pickscore_dir):
    save_components(tiny_sd_components(image_size=8), str(tmp_path / "base"))
    method = lora_dpo_method()
    method.export(tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a red square\n\nthe blue circle\n")
    common = ["--base", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.txt"), "--scorer", "pickscore",
              "--scorer-model", str(pickscore_dir), "--scorer-processor", str(pickscore_dir), "--seeds", "1",
              "--steps", str(SAMPLER.steps), "--guidance", "1", "--device", "cpu"]
    same = dpo_eval.main(common + ["--tuned", str(tmp_path / "base"), "--out", str(tmp_path / "same")])
    assert same["rewards_base"] == same["rewards_tuned"] and same["win_rate"] == 0.5   # identical model, same noise
    dpo_eval.main(common + ["--tuned", str(tmp_path / "lora"), "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "eval_dpo.json").read_text())
    assert written["prompts"] == ["a red square", "the blue circle"] and written["seeds"] == 1
    base, tuned = torch.tensor(written["rewards_base"]), torch.tensor(written["rewards_tuned"])
    assert base.shape == (1, 2) and not torch.equal(base, tuned)
    scorer = build_scorer("pickscore", str(pickscore_dir), str(pickscore_dir))
    for reference, rewards in ((True, base), (False, tuned)):   # the exported LoRA reproduces the method's samples
        expected, _ = sample_rewards(method, written["prompts"], scorer, seed=0, reference=reference)
        torch.testing.assert_close(rewards[0], expected, rtol=1e-4, atol=1e-4)
    assert written["win_rate"] == pytest.approx(win_rate(tuned, base))
    assert written["mean_reward_tuned"] == pytest.approx(tuned.mean().item())
    assert (tmp_path / "out" / "side_by_side.png").is_file()


def test_prompts_come_from_text_or_partiprompts_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame({"Prompt": ["a red square", "two dogs", "a city"], "Category": ["A", "B", "C"]}).to_parquet(
        tmp_path / "parti.parquet")
    assert dpo_eval.read_prompts(str(tmp_path / "parti.parquet"), limit=2) == ["a red square", "two dogs"]
    pd.DataFrame({"words": ["x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: no prompt column.*'Prompt'.*\['words'\]"):
        dpo_eval.read_prompts(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        dpo_eval.read_prompts(str(tmp_path / "empty.txt"))
