"""DataSource: a dataset of batch dicts plus what models need to know about it, and a deterministic batch stream.

Batches are dicts of tensors: ``"x"`` in [-1, 1] ([B, C, H, W] images or [B, D] points), optional ``"label"`` [B] long.

The stream is a pure function of (seed, step): epoch e visits the data in the permutation drawn from (seed, e), and
global step s takes positions [s * B, (s + 1) * B) of the concatenated epochs. Process p of P takes the p-th
contiguous slice of the global batch. So a resumed run sees exactly the batches of an uninterrupted one, and
1 process x 4 micro-batches sees the same samples as 2 processes x 2 micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


class TensorDictDataset(Dataset):
    """In-memory dataset: item i is ``{key: tensor[i]}`` for every tensor (all with the same first dimension)."""

    def __init__(self, **tensors: Tensor):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TensorDictDataset: tensors have different lengths {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def epoch_permutation(num_items: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def global_batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Dataset indices of global step ``step`` (positions [step * B, (step + 1) * B) of the concatenated epochs)."""
    start, stop = step * batch_size, (step + 1) * batch_size
    indices: list[int] = []
    for epoch in range(start // num_items, (stop - 1) // num_items + 1):
        order = epoch_permutation(num_items, seed, epoch)
        lo, hi = max(start - epoch * num_items, 0), min(stop - epoch * num_items, num_items)
        indices += order[lo:hi].tolist()
    return indices


class StepBatchSampler(Sampler[list[int]]):
    """Infinite batch sampler: this process's slice of every global batch from ``start_step`` on."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by the {world_size} processes")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        per_process = self.batch_size // self.world_size
        step = self.start_step
        while True:
            indices = global_batch_indices(self.num_items, self.batch_size, self.seed, step)
            yield indices[self.rank * per_process:(self.rank + 1) * per_process]
            step += 1


@dataclass
class DataSource:
    """What the ``data`` group builds.

    Attributes:
        dataset: torch Dataset whose items are dicts of tensors (``"x"``, optional ``"label"``, ...).
        sample_shape: shape of one ``"x"`` ([C, H, W] or [D]).
        num_classes: number of classes of ``"label"`` (0 = unconditional).
        name: short description for logs.
        extras: anything a method may use (e.g. ``{"denoiser": GaussianMixtureDenoiser}`` for an exact teacher).
    """

    dataset: Dataset
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    name: str = "data"
    extras: dict[str, Any] | None = None

    def loader(self, batch_size: int, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
               num_workers: int = 0) -> Iterator[dict[str, Any]]:
        """Infinite deterministic stream of this process's batch dicts ([batch_size / world_size] each), from
        global step ``start_step`` on (see the module docstring)."""
        sampler = StepBatchSampler(len(self.dataset), batch_size, seed, start_step, rank, world_size)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=num_workers,
                               persistent_workers=num_workers > 0))
