"""A step's data and randomness: micro-batches, device transfer, and the seeds that make every micro-batch's draws
a pure function of (seed, step, stream), so 1 process x 4 micro-batches equals 2 x 2 and a resumed run is identical
to an uninterrupted one."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

PREPARE_STREAM = 1 << 20  # RNG stream ids >= this are prepare passes (one per process), below: micro-batches


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, stream), well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and random: methods may draw from any of them."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def split_batch(batch: dict[str, Any], num: int) -> list[dict[str, Any]]:
    """Split every tensor / list of a batch dict into ``num`` equal consecutive micro-batches."""
    size = len(next(iter(batch.values())))
    if size % num:
        raise ValueError(f"batch of {size} does not split into {num} micro-batches")
    chunk = size // num
    return [{k: v[i * chunk:(i + 1) * chunk] for k, v in batch.items()} for i in range(num)]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
