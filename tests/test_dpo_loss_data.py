"""Diffusion-DPO loss (Wallace et al. 2023, Eq. 14), preference data (Pick-a-Pic layout, built-in pairs), tiny tokenizer."""
import io
import math

import pytest
import torch

from fdistill.data.preference import (COLOURS, SHAPES, pickapic, shape_colour_reward, shape_preferences)
from fdistill.losses import diffusion_dpo_loss, dpo_logits, implicit_reward_accuracy, per_sample_mse, sft_loss
from fdistill.tiny_sd import TINY_WORDS, tiny_clip_tokenizer


# ------------------------------------------------------------------------------------------------ loss

def test_loss_is_log2_at_theta_equal_ref():
    err_w, err_l = torch.rand(7), torch.rand(7)
    loss = diffusion_dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    torch.testing.assert_close(loss, torch.full((7,), math.log(2.0)), rtol=0, atol=1e-7)


def test_loss_matches_eq14_per_pair_not_of_batch_mean():
    model_w, model_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    ref_w, ref_l = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
    beta = 10.0
    expected = [-math.log(1 / (1 + math.exp(0.5 * beta * ((mw - ml) - (rw - rl)))))
                for mw, ml, rw, rl in zip(model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist())]
    loss = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    logit_of_mean = dpo_logits(model_w, model_l, ref_w, ref_l, beta).mean()
    assert abs(loss.mean().item() - (-torch.nn.functional.logsigmoid(logit_of_mean)).item()) > 0.05


def test_gradient_lowers_winner_error_relative_to_loser():
    model_w, model_l = torch.rand(5, requires_grad=True), torch.rand(5, requires_grad=True)
    ref_w, ref_l = model_w.detach().clone(), model_l.detach().clone()
    diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=100.0).sum().backward()
    # gradient descent moves err_w down and err_l up; at theta = ref the slope is beta / 4
    torch.testing.assert_close(model_w.grad, torch.full((5,), 25.0))
    torch.testing.assert_close(model_l.grad, torch.full((5,), -25.0))


def test_implicit_accuracy_sft_and_mse():
    accuracy = implicit_reward_accuracy(torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.2, 0.4, 0.2]),
                                        torch.zeros(3), torch.zeros(3))
    assert accuracy.item() == pytest.approx(1 / 3)
    assert implicit_reward_accuracy(torch.ones(4), torch.ones(4), torch.ones(4), torch.ones(4)).item() == 0.0
    torch.testing.assert_close(sft_loss(torch.tensor([0.5, 1.0])), torch.tensor([0.5, 1.0]))
    prediction, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    prediction[1] = 3.0
    torch.testing.assert_close(per_sample_mse(prediction, target), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), beta=0.0)


# ------------------------------------------------------------------------------------------------ Pick-a-Pic

def _jpeg(colour: str, size=(40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def pickapic_parquet(tmp_path):
    import datasets

    rows = {"jpg_0": [_jpeg("red"), _jpeg("blue"), _jpeg("red"), b"not an image", _jpeg("red")],
            "jpg_1": [_jpeg("blue"), _jpeg("red"), _jpeg("green"), _jpeg("red"), None],
            "label_0": [1.0, 0.0, 0.5, 1.0, 1.0], "label_1": [0.0, 1.0, 0.5, 0.0, 0.0],
            "caption": ["a red thing", "a red thing", "a tie", "corrupt", "missing"]}
    path = tmp_path / "pairs" / "train-0.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path


def test_pickapic_drops_ties_and_puts_winner_first(pickapic_parquet):
    source = pickapic(str(pickapic_parquet.parent), resolution=16, random_flip=False, empty_caption_prob=0.0)
    assert source.extras["stats"] == {"rows": 5, "ties_dropped": 1, "labels_dropped": 0, "bad_skipped": 0, "pairs": 4}
    for index in (0, 1):    # row 1 has label_1 = 1: flipped so that the red image (the winner) comes first
        item = source.dataset[index]
        assert item["x_w"].shape == item["x_l"].shape == (3, 16, 16)
        assert item["x_w"][0].mean() > 0.9 and item["x_w"][2].mean() < -0.9          # red
        assert item["x_l"][2].mean() > 0.9 and item["x_l"][0].mean() < -0.9          # blue
        assert item["caption"] == "a red thing"
        assert item["original_size"].tolist() == [30, 40] and item["crop_top_left"].tolist() == [0, 2]


def test_pickapic_bad_rows_fail_with_row_or_are_skipped(pickapic_parquet):
    source = pickapic(str(pickapic_parquet), resolution=16)
    with pytest.raises(ValueError, match=r"row 3, column 'jpg_0'.*decode"):
        source.dataset[2]
    with pytest.raises(ValueError, match=r"row 4, column 'jpg_1'.*missing"):
        source.dataset[3]
    skipping = pickapic(str(pickapic_parquet), resolution=16, skip_bad=True)
    assert skipping.extras["stats"] == {"rows": 5, "ties_dropped": 1, "labels_dropped": 0, "bad_skipped": 2, "pairs": 2}


def test_pickapic_keeps_only_labels_0_and_1_and_reports_the_drops(tmp_path, capsys):
    """The released training code keeps label_0 in {0, 1}: NaN, missing and soft labels are no preference either."""
    import datasets

    label_0 = [1.0, float("nan"), 0.0, 0.5, 0.7, None, 1.0]
    rows = {"jpg_0": [_jpeg("red")] * 7, "jpg_1": [_jpeg("blue")] * 7, "label_0": label_0,
            "label_1": [0.0] * 7, "caption": [f"row {i}" for i in range(7)]}
    path = tmp_path / "labels.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    source = pickapic(str(path), resolution=16, random_flip=False, empty_caption_prob=0.0)
    assert source.extras["stats"] == {"rows": 7, "ties_dropped": 1, "labels_dropped": 3, "bad_skipped": 0, "pairs": 3}
    assert [source.dataset[i]["caption"] for i in range(3)] == ["row 0", "row 2", "row 6"]
    assert source.dataset[1]["x_w"][2].mean() > 0.9                                  # label_0 = 0: blue image 1 wins
    assert "3 pairs kept of 7 rows (1 ties, 3 rows with label_0 not in {0, 1}" in capsys.readouterr().out


def test_pickapic_empty_captions_and_bad_config(pickapic_parquet, tmp_path):
    torch.manual_seed(0)
    source = pickapic(str(pickapic_parquet), resolution=16, empty_caption_prob=1.0)
    assert source.dataset[0]["caption"] == ""
    torch.manual_seed(0)
    share = pickapic(str(pickapic_parquet), resolution=16, empty_caption_prob=0.2).dataset
    empty = sum(share[0]["caption"] == "" for _ in range(500)) / 500
    assert 0.15 < empty < 0.25
    with pytest.raises(ValueError, match="empty_caption_prob"):
        pickapic(str(pickapic_parquet), resolution=16, empty_caption_prob=1.5)
    import datasets
    datasets.Dataset.from_dict({"jpg_0": [b""], "caption": ["x"]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match="lacks the Pick-a-Pic columns"):
        pickapic(str(tmp_path / "bad.parquet"), resolution=16)


# ------------------------------------------------------------------------------------------------ built-in pairs

def test_builtin_pairs_follow_the_known_rule():
    source = shape_preferences(num_pairs=200, resolution=16)
    pairs = source.dataset
    reward = source.extras["reward"]
    assert (reward(pairs.x_w, pairs.captions) > reward(pairs.x_l, pairs.captions)).all()
    assert pairs.x_w.min() >= -1 and pairs.x_w.max() <= 1 and pairs.x_w.shape == (200, 3, 16, 16)
    assert len(source.extras["prompts"]) == len(COLOURS) * len(SHAPES)
    test = shape_preferences(num_pairs=200, resolution=16, split="test").dataset
    assert not torch.equal(test.x_w, pairs.x_w)
    # grey scores 0; pure named colour scores the norm of its chroma
    grey = torch.zeros(1, 3, 4, 4)
    assert shape_colour_reward(grey, ["a red square"]).item() == pytest.approx(0.0, abs=1e-6)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert shape_colour_reward(red, ["a red circle"]).item() == pytest.approx(math.sqrt(8 / 3), rel=1e-5)
    assert shape_colour_reward(red, ["a blue circle"]).item() < 0
    with pytest.raises(ValueError, match="names no colour"):
        shape_colour_reward(red, ["a square"])


def test_tiny_tokenizer_is_offline_and_whole_word():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer(["a red square"]).input_ids[0]
    assert len(ids) == 5     # bos, 3 whole-word tokens, eos
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "square</w>"]
    assert all(tokenizer.convert_tokens_to_ids(w + "</w>") != tokenizer.unk_token_id for w in TINY_WORDS)
    padded = tokenizer(["a red square", ""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert padded.shape == (2, 16)


def test_caption_colour_accuracy_reads_the_dominant_colour_of_each_image():
    from fdistill.data.preference import COLOURS, caption_colour_accuracy, image_colours

    # a square of each colour on a grey background, drawn in [-1, 1]
    images = torch.zeros(len(COLOURS), 3, 8, 8)
    for index, rgb in enumerate(COLOURS.values()):
        images[index, :, 2:6, 2:6] = torch.tensor(rgb)[:, None, None] * 2 - 1
    assert image_colours(images).tolist() == list(range(len(COLOURS)))
    captions = [f"a {name} square" for name in COLOURS]
    assert caption_colour_accuracy(images, captions) == 1.0
    assert caption_colour_accuracy(images, captions[1:] + captions[:1]) == 0.0
