"""The built-in preference pairs' generator and rules: coloured shapes on a grey background, and for each rule how
the loser differs from the winner and the KNOWN reward that ranks them (``fdistill.data.preference.shape_preferences``
wraps them as a DataSource).

Rules (``PREFERENCE_RULES``):
    colour:     the caption names the winner's colour; the loser shows the shape in another colour (needs the text).
    brightness: the loser is the same picture with a darker background (the same preference for every caption).
    size:       the loser is the same shape, colour and centre, smaller (``loser_radius``); the
                caption ("a <colour> <shape>") is the same for both, so the preference is not in the text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..evaluation.rewards import shape_area_reward

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("square", "circle", "cross")


def shape_mask(shape: str, size: int, centre: Tensor, radius: Tensor) -> Tensor:
    """[size, size] bool mask of a square, disc or plus-shaped cross with the given centre (row, col) and radius."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy, dx = (coords[:, None] - centre[0]).abs(), (coords[None, :] - centre[1]).abs()
    if shape == "square":
        return (dy <= radius) & (dx <= radius)
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= radius ** 2
    arm = radius / 3
    return ((dy <= radius) & (dx <= arm)) | ((dx <= radius) & (dy <= arm))


def _chroma_directions() -> Tensor:
    """[K, 3] unit vectors of the colours of COLOURS with the grey component removed (order of COLOURS)."""
    rgb = torch.tensor(list(COLOURS.values()))
    centred = rgb - rgb.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True)


def caption_colour(caption: str) -> int:
    """Index in COLOURS of the first colour word of ``caption``; ValueError if it names none."""
    for word in caption.lower().split():
        if word in COLOURS:
            return list(COLOURS).index(word)
    raise ValueError(f"caption {caption!r} names no colour of {list(COLOURS)}")


def shape_colour_reward(images: Tensor, captions: list[str]) -> Tensor:
    """The KNOWN preference rule of the built-in pairs as a scorer: mean over pixels of the projection of the pixel
    colour (grey removed) onto the caption's colour direction, in [-1, 1] image units. [B, 3, H, W] -> [B].

    Grey pixels score 0, pixels of the named colour score > 0; the winner of every built-in pair scores higher
    than its loser (same layout, only the shape's colour differs)."""
    directions = _chroma_directions().to(images)[[caption_colour(c) for c in captions]]      # [B, 3]
    grey_removed = images - images.mean(dim=1, keepdim=True)
    return torch.einsum("bchw,bc->b", grey_removed, directions) / (images.shape[-1] * images.shape[-2])


def image_colours(images: Tensor) -> Tensor:
    """Index in COLOURS [B] of the colour an image [B, 3, H, W] shows most: the largest mean projection of its pixels
    (grey removed) onto the colours' directions."""
    grey_removed = images - images.mean(dim=1, keepdim=True)
    return torch.einsum("bchw,kc->bk", grey_removed, _chroma_directions().to(images)).argmax(dim=1)


def caption_colour_accuracy(images: Tensor, captions: list[str]) -> float:
    """Share of images [B, 3, H, W] whose dominant colour (``image_colours``) is the one their caption names."""
    named = torch.tensor([caption_colour(c) for c in captions], device=images.device)
    return float((image_colours(images) == named).float().mean())


def _shape_image(mask: Tensor, colour: Tensor, background: float, noise: Tensor) -> Tensor:
    image = torch.full((3, *mask.shape), background)
    image = torch.where(mask, colour[:, None, None] * 2.0 - 1.0, image)
    return (image + noise).clamp(-1, 1)


def brightness_reward(images: Tensor, captions: list[str]) -> Tensor:
    """The caption-independent rule of the built-in pairs: mean pixel value (brighter is better), [B, 3, H, W] -> [B]."""
    return images.flatten(1).mean(dim=1)


@dataclass(frozen=True)
class Loser:
    """How a pair's loser differs from its winner: its colour index, background shift (image units) and radius scale."""

    colour: int
    background_shift: float = 0.0
    radius_scale: float = 1.0


SIZE_RULE_SCALE = 0.6     # the size rule's loser radius / winner radius


def loser_radius(radius: Tensor, scale: float) -> Tensor:
    """The loser's shape radius (pixels): ``radius`` when ``scale`` is 1, else min(scale x radius, radius - 1), at
    least one pixel smaller so that the smaller shape covers strictly fewer pixels at any resolution (a 0.6 scale
    alone can keep the same pixel count at 8 x 8)."""
    return radius if scale == 1.0 else torch.minimum(radius * scale, radius - 1.0)


def _other_colour(colour: int, generator: torch.Generator) -> Loser:
    return Loser((colour + int(torch.randint(1, len(COLOURS), (), generator=generator))) % len(COLOURS))


# rule -> (the loser given the winner's colour index and a generator, the known reward)
PREFERENCE_RULES: dict[str, tuple[Callable[[int, torch.Generator], Loser], Callable[[Tensor, list[str]], Tensor]]] = {
    "colour": (_other_colour, shape_colour_reward),
    "brightness": (lambda colour, generator: Loser(colour, background_shift=-0.4), brightness_reward),
    "size": (lambda colour, generator: Loser(colour, radius_scale=SIZE_RULE_SCALE), shape_area_reward),
}


def generate_shape_pairs(num_pairs: int, resolution: int = 16, seed: int = 0, rule: str = "colour") -> dict[str, Any]:
    """Pairs of images of one shape (caption "a <colour> <shape>") on a grey background; the loser differs from
    the winner only as the ``rule`` of PREFERENCE_RULES says (same shape, same place, same pixel noise).

    Returns tensors x_w, x_l [N, 3, R, R] in [-1, 1] and the list of captions."""
    if rule not in PREFERENCE_RULES:
        raise ValueError(f"data.rule must be one of {sorted(PREFERENCE_RULES)}, got {rule!r}")
    loser_of = PREFERENCE_RULES[rule][0]
    generator = torch.Generator().manual_seed(seed)
    names, palette = list(COLOURS), torch.tensor(list(COLOURS.values()))
    x_w, x_l, captions = [], [], []
    for _ in range(num_pairs):
        colour = int(torch.randint(len(names), (), generator=generator))
        shape = int(torch.randint(len(SHAPES), (), generator=generator))
        loser = loser_of(colour, generator)
        radius = resolution * (0.2 + 0.15 * torch.rand((), generator=generator))
        centre = radius + (resolution - 2 * radius) * torch.rand(2, generator=generator)
        background = float(-0.6 + 0.4 * torch.rand((), generator=generator)) - loser.background_shift / 2
        noise = 0.03 * torch.randn(3, resolution, resolution, generator=generator)
        x_w.append(_shape_image(shape_mask(SHAPES[shape], resolution, centre, radius), palette[colour], background, noise))
        x_l.append(_shape_image(shape_mask(SHAPES[shape], resolution, centre, loser_radius(radius, loser.radius_scale)),
                                palette[loser.colour], background + loser.background_shift, noise))
        captions.append(f"a {names[colour]} {SHAPES[shape]}")
    return {"x_w": torch.stack(x_w), "x_l": torch.stack(x_l), "captions": captions}


