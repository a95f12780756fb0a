"""The built-in preference rules (``fdistill.data.preference_rules``): the 'size' rule's pairs and its known reward."""
import pytest
import torch

from fdistill.data.preference import COLOURS, shape_preferences
from fdistill.data.preference_rules import image_colours, loser_radius
from fdistill.evaluation.rewards import SATURATED_CHROMA, shape_area_reward


def _coloured_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pixels [N] whose grey-removed colour is at least half saturated (the shape; the grey background is not)."""
    chroma = (images - images.mean(dim=1, keepdim=True)).norm(dim=1)
    return (chroma > SATURATED_CHROMA / 2).flatten(1).sum(dim=1)


@pytest.mark.parametrize("resolution, split", [(8, "train"), (8, "test"), (16, "train")])
def test_size_rule_winner_has_the_larger_shape_same_colour_same_caption(resolution, split):
    data = shape_preferences(1024, resolution, split=split, rule="size")
    pairs = data.dataset
    winner_pixels, loser_pixels = _coloured_pixels(pairs.x_w), _coloured_pixels(pairs.x_l)
    assert (winner_pixels > loser_pixels).all()
    assert (loser_pixels > 0).float().mean() > 0.9               # the loser is a smaller shape, not a blank picture
    # one caption per pair, naming the colour both images show: the preference is not in the text
    named = torch.tensor([list(COLOURS).index(c.split()[1]) for c in pairs.captions])
    shown = loser_pixels > 0
    assert torch.equal(image_colours(pairs.x_w), named) and torch.equal(image_colours(pairs.x_l)[shown], named[shown])
    item = pairs[0]
    assert item["caption"] == pairs.captions[0]
    # same background and pixel noise: off the winner's shape the two images are equal
    background = (pairs.x_w - pairs.x_w.mean(dim=1, keepdim=True)).norm(dim=1) < 0.3
    torch.testing.assert_close(pairs.x_w.permute(0, 2, 3, 1)[background], pairs.x_l.permute(0, 2, 3, 1)[background])


def test_size_rule_reward_ranks_every_pair_and_is_the_data_sources_reward():
    data = shape_preferences(1024, 8, rule="size")
    pairs = data.dataset
    assert data.extras["reward"] is shape_area_reward
    assert (shape_area_reward(pairs.x_w, pairs.captions) > shape_area_reward(pairs.x_l, pairs.captions)).all()


def test_shape_area_reward_is_the_share_of_coloured_pixels():
    grey = torch.full((1, 3, 8, 8), -0.3)
    half = grey.clone()
    half[0, :, :4] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]          # red on the top half
    full_yellow = torch.tensor([1.0, 1.0, -1.0])[None, :, None, None].expand(1, 3, 8, 8)
    scores = shape_area_reward(torch.cat([grey, half, full_yellow]), ["a red square"] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="one prompt per image"):
        shape_area_reward(grey, [])


def test_loser_radius_is_at_least_one_pixel_smaller():
    radius = torch.tensor([1.6, 2.0, 5.0])
    torch.testing.assert_close(loser_radius(radius, 0.6), torch.tensor([0.6, 1.0, 3.0]))
    assert loser_radius(radius, 1.0) is radius
