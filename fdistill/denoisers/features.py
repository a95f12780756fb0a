"""Intermediate activations of a wrapped network, for discriminator heads (f-distill, GAN losses).

Features are read with a forward hook on one named sub-module (default: the UNet bottleneck ``mid_block``), so
``forward`` keeps returning x0 only; the wrappers expose ``features`` and ``x0_and_features`` as separate methods.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn


def resolve_block(net: nn.Module, name: str) -> nn.Module:
    """The sub-module ``name`` of ``net`` (dotted path, e.g. "mid_block", "down_blocks.1", "transformer_blocks.3")."""
    try:
        return net.get_submodule(name)
    except AttributeError as error:
        top_level = [child for child, _ in net.named_children()]
        raise ValueError(f"feature_block {name!r} is not a sub-module of {type(net).__name__}; "
                         f"top-level blocks: {top_level}") from error


def _first_tensor(output: Any) -> Tensor:
    """A block may return a tensor or a tuple (hidden_states, residuals...): the hidden states come first."""
    return output if isinstance(output, Tensor) else output[0]


def run_capturing(block: nn.Module, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """Call ``run()`` while recording the output of ``block``; returns (run's result, the block's output).

    The captured tensor keeps its autograd graph (discriminator losses backpropagate through it).
    """
    captured: list[Tensor] = []
    handle = block.register_forward_hook(lambda _module, _inputs, output: captured.append(_first_tensor(output)))
    try:
        result = run()
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"feature block {type(block).__name__} was not called by the forward pass")
    return result, captured[-1]


class FeatureMixin:
    """``features`` / ``x0_and_features`` for a wrapper holding ``self.net`` and ``self.feature_block`` (a name)."""

    net: nn.Module
    feature_block: str

    def x0_and_features(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> tuple[Tensor, Tensor]:
        """One forward pass: (x0 [B, *shape] float32, features of ``feature_block``, e.g. [B, C', h, w])."""
        block = resolve_block(self.net, self.feature_block)
        return run_capturing(block, lambda: self(x, sigma, cond))

    def features(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        """Features of ``feature_block`` for noisy input x at noise level sigma ([B, C', h, w] for UNets, [B, N, D]
        tokens for DiT blocks). Same preprocessing as ``forward``; the features are in the network's dtype."""
        return self.x0_and_features(x, sigma, cond)[1]
