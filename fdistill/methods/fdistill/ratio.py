"""f-distill's density-ratio normalisation with global-batch statistics (Xu, Nie & Vahdat 2025, Sec. 3.3-3.4).

The discriminator's ratio r(x_t) = p_t / q_t varies by orders of magnitude across noise levels, so the weights
h(r) of the student loss are computed from r / (mean r of its noise-level bin) and then divided by their global
mean. Every mean is over the global batch (all processes, all micro-batches): sums and counts are reduced by SUM
and divided once, so a bin that only some processes saw still gets its exact mean.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ...losses.fdistill import binned_sums, noise_level_bins

ReduceSum = Callable[[Tensor], Tensor]


class RatioNormaliser(nn.Module):
    """r -> r / mean_bin(r), with bins uniform in the quantile u of each sample's noise level.

    Buffers (persistent: checkpointed and copied into EMA snapshots):
        bin_means: [num_bins] float32, the per-bin means of the last training step (EMA-blended), 1 initially.
        bins_seen: [num_bins] bool, bins that have had samples in some training step.

    Args:
        num_bins: number of bins (0 = no normalisation: ratios pass unchanged).
        ema: decay of the per-bin means across steps, in [0, 1) (0 = this step's global batch only).
    """

    def __init__(self, num_bins: int, ema: float = 0.0):
        super().__init__()
        self.num_bins = int(num_bins)
        self.ema = float(ema)
        self.register_buffer("bin_means", torch.ones(self.num_bins))
        self.register_buffer("bins_seen", torch.zeros(self.num_bins, dtype=torch.bool))

    def forward(self, ratios: list[Tensor], quantiles: list[Tensor], reduce_sum: ReduceSum,
                update: bool = True) -> list[Tensor]:
        """Normalised ratios, one [b_i] float32 tensor per micro-batch.

        Args:
            ratios: r of each micro-batch of this process, [b_i] each.
            quantiles: CDF values u in [0, 1) [b_i] of each sample's sigma under the sampling distribution.
            reduce_sum: sums a tensor over all processes (identity on one); called once (a collective).
            update: store the step's bin means (training); False leaves the buffers untouched (evaluation).
        """
        if not self.num_bins:
            return ratios
        bins = [noise_level_bins(q, self.num_bins) for q in quantiles]
        per_micro_batch = (binned_sums(r, b, self.num_bins) for r, b in zip(ratios, bins))
        sums, counts = (torch.stack(parts).sum(0) for parts in zip(*per_micro_batch))
        reduced = reduce_sum(torch.stack([sums, counts]))
        means = self.step_bin_means(reduced[0], reduced[1], update)
        return [(r.double() / means[b]).float() for r, b in zip(ratios, bins)]

    def step_bin_means(self, sums: Tensor, counts: Tensor, update: bool) -> Tensor:
        """Per-bin means [num_bins] (float64) from global sums and counts: bins without samples keep the stored
        value; with ``ema`` > 0, bins seen before are blended, ema * stored + (1 - ema) * current."""
        seen = counts > 0
        stored = self.bin_means.to(sums.device, torch.float64)
        current = torch.where(seen, sums / counts.clamp_min(1), stored)     # counts are whole numbers: >= 1 if seen
        if self.ema > 0:
            blend = self.bins_seen.to(sums.device) & seen
            current = torch.where(blend, self.ema * stored + (1 - self.ema) * current, current)
        if update:
            self.bin_means.copy_(current)
            self.bins_seen |= seen.to(self.bins_seen.device)
        return current


def mean_one_weights(weights: list[Tensor], reduce_sum: ReduceSum) -> tuple[list[Tensor], Tensor]:
    """``weights`` (one [b_i] tensor per micro-batch) divided by their global mean (all processes), and that mean
    (float64 scalar). ``reduce_sum`` is called once."""
    local = torch.stack([sum(w.double().sum() for w in weights),
                         torch.tensor(float(sum(w.numel() for w in weights)), dtype=torch.float64,
                                      device=weights[0].device)])
    total, count = reduce_sum(local).unbind()
    mean = total / count
    return [(w.double() / mean).float() for w in weights], mean
