"""Checkpoints of runs whose trained parameters the engine shards (FSDP2): every process writes its own shard of
the trained parameters and of their optimizer states, and any engine at any world size reads them back.

This is torch.distributed.checkpoint (DCP) with its Hugging Face storage: each process writes one safetensors
file holding its pieces, with their offsets in the global tensors in the file's header, and DCP's load planner
reads whichever slices the reading process needs (resharding onto another number of processes, or the full tensor
into a process that does not shard). Nothing on the read side unpickles: the files are safetensors, and DCP's own
pickled `.metadata` file is not used. Every tensor is named by its role and the recipe's parameter name, not by
the module that holds it, so the files do not depend on how the engine wrapped or grouped the networks; the param
groups' settings go into the checkpoint's `optimizer_groups.pt`, read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

SHARDS = "shards"   # the sub-folder of a checkpoint holding the per-process safetensors files


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether an engine sharded any of `tensors` (FSDP2's DTensors), so the forwards that use them are collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def collective_forwards(params: Iterable[Tensor]) -> bool:
    """Whether a forward through these parameters is a collective call (every process must run it the same number
    of times): FSDP2 shards them (DTensors) or DeepSpeed ZeRO-3 partitions them (they carry a `ds_id`)."""
    params = list(params)
    return is_sharded(params) or any(hasattr(p, "ds_id") for p in params)


def _optimizer(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)   # inside accelerate's AcceleratedOptimizer


def _initialised(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` with a state for every parameter (torch's DCP helper: one step with zero gradients at lr 0), so a
    checkpoint written before a role first stepped, and the tensors a checkpoint loads into, exist."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(opt)
    return opt


def run_state(params: dict[str, dict[str, nn.Parameter]], optimizers: dict[str, Any],
              extra: dict[str, dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, list[dict[str, Any]]]]:
    """(tensors DCP writes and reads in place, the optimizers' param-group settings by role). Every key is a
    name that does not depend on how the networks are wrapped or sharded: `trainable.<role>.<name>` for the
    parameters, `optim.<role>.<name>.<state>` for their optimizer states (Adam's moments and step), and
    `<group>.<key>` for the other tensors in `extra` (a target network, the EMA's shadow weights); the settings
    list each param group's hyper-parameters with its parameters' names in order."""
    tensors: dict[str, Tensor] = {}
    settings: dict[str, list[dict[str, Any]]] = {}
    for role, named in params.items():
        opt = _initialised(_optimizer(optimizers[role]))
        name = {id(p): k for k, p in named.items()}
        tensors.update({f"trainable.{role}.{k}": p.detach() for k, p in named.items()})
        tensors.update({f"optim.{role}.{k}.{key}": v for k, p in named.items() for key, v in opt.state[p].items()})
        settings[role] = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [name[id(p)] for p in g["params"]]} for g in opt.param_groups]
    for group, state in extra.items():
        tensors.update({f"{group}.{k}": v for k, v in state.items()})
    return tensors, settings


def save_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Every process writes its pieces of `tensors` into folder/shards (a collective call: all processes at once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))


def load_shards(folder: Path, params: dict[str, dict[str, nn.Parameter]], optimizers: dict[str, Any],
                extra: dict[str, dict[str, Tensor]], settings: dict[str, list[dict[str, Any]]]) -> None:
    """Read folder/shards into this run's parameters, optimizer states and `extra` tensors in place (whatever
    their sharding), then give each optimizer its saved param-group settings (`settings`, from
    optimizer_groups.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not all(isinstance(groups, list) for groups in settings.values()):
        raise ValueError("it was written in the sharded format of fewstep before 2026-12-03 (tensors named by "
                         "module); resume it with that version")
    tensors, mine = run_state(params, optimizers, extra)
    for role, groups in mine.items():
        if [g["params"] for g in groups] != [g["params"] for g in settings.get(role, [])]:
            raise ValueError(f"the {role}'s optimizer holds other parameters than the checkpoint's")
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))
    for role, groups in settings.items():
        for group, saved in zip(_optimizer(optimizers[role]).param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})


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
