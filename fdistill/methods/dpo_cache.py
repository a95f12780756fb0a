"""Diffusion-DPO's encoded-data cache: VAE latents of winners / losers and the text conditioning of every pair,
computed once with the method's frozen encoders (``method.cache_path``) and read back as tensors only."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .diffusion_dpo import DiffusionDPO


def ordered_batches(dataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """The data set in order, collated into batch dicts (the last batch may be smaller)."""
    from torch.utils.data import DataLoader

    return iter(DataLoader(dataset, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def encode_dataset(method: DiffusionDPO, dataset, batch_size: int = 16) -> dict[str, Tensor]:
    """VAE latents of winners / losers and text conditioning of every pair, stacked ([N, ...] tensors)."""
    device = next(method.frozen["vae"].parameters()).device
    parts: dict[str, list[Tensor]] = {}
    for batch in ordered_batches(dataset, batch_size):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        encoded = method.encode_batch(batch)
        row = {"latents_w": encoded["latents_w"], "latents_l": encoded["latents_l"],
               **method.sd.conditioning_tensors(encoded["cond"])}
        for key, value in row.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def cached_dataset(method: DiffusionDPO, dataset, path: str | Path):
    """A TensorDictDataset of encoded pairs, read from ``path`` or computed once (VAE encode once) and written there."""
    from ..data.base import TensorDictDataset

    path = Path(path)
    if path.is_file():
        try:                              # tensors only: a cache file never runs code when it is read
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"method.cache_path {path}: not a tensor cache (it holds other objects, which are not "
                             "unpickled); delete it to encode the data again") from error
    else:
        tensors = encode_dataset(method, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path)
    if len(tensors["latents_w"]) != len(dataset):
        raise ValueError(f"method.cache_path={str(path)!r} holds {len(tensors['latents_w'])} pairs but the data has "
                         f"{len(dataset)}: delete the cache or point cache_path elsewhere")
    return TensorDictDataset(**tensors)
