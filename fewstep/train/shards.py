"""Checkpoints of runs whose trained parameters the engine shards (FSDP2): every process writes its own shard of
the trained parameters and of their optimizer states, and any engine at any world size reads them back.

This is torch.distributed.checkpoint (DCP) with its Hugging Face storage: each process writes one safetensors
file holding its pieces, with their offsets in the global tensors in the file's header, and DCP's load planner
reads whichever slices the reading process needs (resharding onto another number of processes, or the full tensor
into a process that does not shard). Nothing on the read side unpickles: the files are safetensors, and DCP's own
pickled `.metadata` file is not used. Optimizer states come from torch's `get_optimizer_state_dict` (flattened, keyed
by parameter name, so they do not depend on the sharding); their non-tensor part (the param groups' settings) goes
into the checkpoint's `optimizer_groups.pt`, read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SHARDS = "shards"   # the sub-folder of a checkpoint holding the per-process safetensors files


def _flat_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _optimizer(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)   # inside accelerate's AcceleratedOptimizer


def role_state(params: dict[str, dict[str, nn.Parameter]], optimizers: dict[str, Any],
               networks: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """(tensors DCP writes and reads in place, the optimizers' non-tensor settings by role): the trained
    parameters as `trainable.<role>.<name>` and the optimizer states as `optim.<role>.state.<name>.<key>`, where
    `networks[role]` is the network holding the role's parameters (the names are its parameter names). Building
    it initialises optimizer states that do not exist yet (torch steps once with zero gradients and lr 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors: dict[str, Tensor] = {}
    settings: dict[str, dict[str, Any]] = {}
    for role, named in params.items():
        tensors.update({f"trainable.{role}.{k}": p.detach() for k, p in named.items()})
        flat = get_optimizer_state_dict(networks[role], _optimizer(optimizers[role]), options=_flat_options())
        settings[role] = {k: v for k, v in flat.items() if not isinstance(v, Tensor)}
        tensors.update({f"optim.{role}.{k}": v for k, v in flat.items() if isinstance(v, Tensor)})
    return tensors, settings


def save_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Every process writes its pieces of `tensors` into folder/shards (a collective call: all processes at once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))


def load_shards(folder: Path, params: dict[str, dict[str, nn.Parameter]], optimizers: dict[str, Any],
                networks: dict[str, nn.Module], settings: dict[str, dict[str, Any]]) -> None:
    """Read folder/shards into this run's parameters and optimizer states in place (whatever their sharding),
    then give each optimizer its saved param-group settings (`settings`, from optimizer_groups.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors, _ = role_state(params, optimizers, networks)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))
    for role in params:
        prefix = f"optim.{role}."
        flat = {**settings[role], **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}}
        set_optimizer_state_dict(networks[role], _optimizer(optimizers[role]), flat, options=_flat_options())


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` whose parameters are on the meta device (no memory) and whose buffers are real: the
    skeleton that `unsharded` fills with a sharded network's gathered weights for the export."""
    import copy

    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in net.parameters()}
    return copy.deepcopy(net, memo)


def unsharded(net: nn.Module, skeleton: nn.Module, is_main: bool) -> nn.Module | None:
    """The full weights of FSDP2-sharded `net` gathered on the main process into `skeleton` (from `meta_copy`
    before sharding): an ordinary module the export writes like any other. A collective call; other processes
    get None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    skeleton.load_state_dict(full, assign=True)   # the gathered tensors are on the CPU (cpu_offload)
    return skeleton
