"""Fully sharded data parallel training (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) for the one trainer.

With FSDP on (``train.fsdp=true``, or ``accelerate launch --config_file fsdp.yaml`` whose config sets
``distributed_type: FSDP``) and more than one process, every network that a phase trains is sharded: each process
keeps 1/N of its parameters, gradients and optimizer states. Per network the submodules holding at least
``train.fsdp_min_params`` parameters become their own FSDP units (all-gathered one at a time in forward and
backward), the network itself is the outer unit. Frozen networks (teacher, reference) stay replicated.

Everything a run writes is FULL and unsharded, in the same layout as a run without FSDP: checkpoints gather the
shards (every process takes part, the main process writes), so a run resumes with any process count, with or
without FSDP. Sample grids, evaluation and ``export`` run on the main process on full copies of the sharded networks
(``NetworkTemplates``), so exported models are plain Diffusers / fdistill models.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

FSDP_OPTIMIZERS = ("adamw", "adam")
UNSHARDABLE_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: FSDP could never all-gather them


def fsdp_requested(train_fsdp: bool, distributed_type: Any) -> bool:
    """FSDP is on when ``train.fsdp`` is true or accelerate was launched with an FSDP config. (On the CPU accelerate
    keeps ``distributed_type`` MULTI_CPU, so its launcher's ``ACCELERATE_USE_FSDP`` environment flag is read too.)"""
    launched_with_fsdp = str(distributed_type).upper().endswith("FSDP") or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return bool(train_fsdp) or launched_with_fsdp


def check_fsdp_support(phases: Iterable[Any], mixed_precision: str) -> None:
    """Fail at start-up on settings the sharded path does not support (messages name the field and allowed values).

    fp16 needs a loss scaler whose inf/NaN check sees every shard; Adafactor's factored statistics do not split
    along the sharded dimension; bf16 (autocast) and Adam/AdamW work on shards unchanged.
    """
    if mixed_precision == "fp16":
        raise ValueError("train.mixed_precision='fp16' is not supported with FSDP: use 'bf16' or 'no'")
    for phase in phases:
        if phase.optimizer not in FSDP_OPTIMIZERS:
            raise ValueError(f"method.optimizer={phase.optimizer!r} (phase {phase.name!r}) is not supported with FSDP: "
                             f"use one of {FSDP_OPTIMIZERS}")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shard_units(network: nn.Module, min_params: int) -> list[nn.Module]:
    """The modules to wrap with ``fully_shard``, innermost first, ``network`` itself last: every submodule with at
    least ``min_params`` parameters in total, and every direct child with parameters (ModuleList / ModuleDict
    excluded: they have no forward to hook). FSDP all-gathers a unit in its forward hook, so a child that a method
    calls directly, bypassing the network's forward (``network.net(...)`` of the denoiser wrappers), must be a unit."""
    children = {id(child) for child in network.children()}
    inner = [m for m in network.modules() if m is not network and not isinstance(m, UNSHARDABLE_CONTAINERS)
             and parameter_count(m) >= (1 if id(m) in children else min_params)]
    depth = {m: name.count(".") for name, m in network.named_modules()}
    return sorted(inner, key=lambda m: -depth[m]) + [network]


def shard_networks(networks: dict[str, nn.Module], mesh, min_params: int) -> None:
    """Shard each network in place (its parameters become DTensors sharded on dim 0 over ``mesh``)."""
    from torch.distributed.fsdp import fully_shard

    for network in networks.values():
        for unit in shard_units(network, min_params):
            fully_shard(unit, mesh=mesh)


def set_gradient_sync(networks: Iterable[nn.Module], enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (off for all but the last micro-batch of a step:
    gradients then accumulate unsharded locally and are reduced once)."""
    for network in networks:
        network.set_requires_gradient_sync(enabled)


def is_sharded(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def full_value(value: Tensor) -> Tensor:
    """A full (gathered) copy of a sharded tensor; plain tensors unchanged. Collective for DTensors: every process
    must call it for the same tensors in the same order."""
    return value.full_tensor() if is_sharded(value) else value


def full_tensors(tensors: dict[str, Tensor], keep: bool = True) -> dict[str, Tensor]:
    """``tensors`` with every DTensor gathered to a full CPU tensor (collective, see ``full_value``). A process that
    only helps gather (``keep=False``: not the one writing) drops each full tensor at once and gets {}: host memory
    for one full copy of a large model per process would add up."""
    gathered = {}
    for key, value in tensors.items():
        value = full_value(value).cpu() if is_sharded(value) else value
        if keep:
            gathered[key] = value
    return gathered


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (an unsharded checkpoint tensor) sharded the way ``like`` is; unchanged when ``like`` is not sharded.
    Every process holds the full tensor (all read the checkpoint), so each keeps its own chunk: no communication."""
    if not is_sharded(like):
        return full
    local = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def shard_tensors_like(full: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: shard_like(v, like[k]) if k in like else v for k, v in full.items()}


def full_optimizer_state(state: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """An optimizer ``state_dict()`` with sharded state tensors (Adam moments) gathered: the plain layout of an
    unsharded optimizer (collective under FSDP; ``keep=False``: per-parameter states dropped, see ``full_tensors``)."""
    per_param = {index: full_tensors(values, keep) for index, values in state["state"].items()}
    return {**state, "state": per_param}


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state (``full_optimizer_state`` or a run without FSDP) sharded like ``optimizer``'s
    parameters, ready for ``optimizer.load_state_dict``. Per-parameter tensors of the parameter's full shape (Adam
    moments) are sharded like the parameter; scalars (the step count) are kept."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        per_param[index] = {k: shard_like(v, param) if isinstance(v, Tensor) and v.shape == param.shape else v
                            for k, v in values.items()}
    return {**state, "state": per_param}


class NetworkTemplates:
    """Unsharded copies of networks, kept on the meta device (no memory) with their non-persistent buffers, from
    which ``materialize`` builds a full, plain copy loaded with a gathered state dict (sampling, evaluation, export).

    Take the templates before sharding: ``fully_shard`` changes the networks' classes and parameters in place.
    """

    def __init__(self, networks: dict[str, nn.Module]):
        self.templates = {name: meta_copy(net) for name, net in networks.items()}
        self.buffers = {name: non_persistent_buffers(net) for name, net in networks.items()}

    def materialize(self, name: str, state: dict[str, Tensor], device: torch.device) -> nn.Module:
        network = copy.deepcopy(self.templates[name]).to_empty(device=device)
        network.load_state_dict(state, strict=True)
        for key, value in self.buffers[name].items():
            network.get_buffer(key).copy_(value)
        return network


def meta_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with its parameters and buffers on the meta device, made without a transient second
    full copy of the weights (deepcopy then ``.to("meta")`` would hold one: ~10 GB for an fp32 SDXL UNet)."""
    memo = {}
    for tensor in (*network.parameters(), *network.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(network, memo)


def non_persistent_buffers(network: nn.Module) -> dict[str, Tensor]:
    """Buffers that ``state_dict`` leaves out (e.g. precomputed frequency tables): copied so a materialized network
    has them (``to_empty`` leaves them uninitialised)."""
    persistent = set(network.state_dict())
    return {name: buffer.detach().cpu().clone() for name, buffer in network.named_buffers() if name not in persistent}
