"""Checkpoints of runs whose trained parameters an engine spreads over the processes (FSDP2 shards, DeepSpeed ZeRO
partitions): every process writes its own part of the trained parameters and of their optimizer states, and any
engine at any world size reads them back.

This is torch.distributed.checkpoint (DCP) with its Hugging Face storage: each process writes one safetensors
file holding its pieces, with their offsets in the global tensors in the file's header, and DCP's load planner
reads whichever slices the reading process needs (resharding onto another number of processes or another engine,
or the full tensor into a process that holds it whole). Every tensor is stored flattened, because what each engine
holds of a parameter is one contiguous range of its flattened elements: FSDP2 a block of rows, ZeRO-3 an equal
slice of the padded flat parameter, ZeRO-1/2 whatever range of the parameter falls into its slice of the flat
param group (`Local`; DCP's `CheckpointableTensor` protocol names the range). Nothing on the read side unpickles:
the files are safetensors, and DCP's own pickled `.metadata` file is not used. Every tensor is named by its role
and the recipe's parameter name, not by the module that holds it, so the files do not depend on how the engine
wrapped or grouped the networks; the param groups' settings go into the checkpoint's `optimizer_groups.pt`, read
with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

SHARDS = "shards"   # the sub-folder of a checkpoint holding the per-process safetensors files
LAYOUT = "flat"     # state.json's `shards` value: how the tensors are stored (fewstep before 2026-12-07: shaped)


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether an engine sharded any of `tensors` (FSDP2's DTensors), so the forwards that use them are collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def collective_forwards(params: Iterable[Tensor]) -> bool:
    """Whether a forward through these parameters is a collective call (every process must run it the same number
    of times): FSDP2 shards them (DTensors) or DeepSpeed ZeRO-3 partitions them (they carry a `ds_id`)."""
    params = list(params)
    return is_sharded(params) or any(hasattr(p, "ds_id") for p in params)


@dataclass
class Local:
    """What this process holds of one tensor of `total` elements: elements [start, start + values.numel()) of its
    flattened form, as a 1-D tensor that a load writes into in place."""
    start: int
    total: int
    values: Tensor

    def fill(self, full: Tensor) -> None:
        """Copy this process's range out of the whole tensor `full` (a checkpoint of full tensors) into `values`."""
        n = self.values.numel()
        with torch.no_grad():   # ZeRO's fp32 partitions are leaves that require grad
            self.values.copy_(full.reshape(-1)[self.start:self.start + n].to(self.values.device,
                                                                             self.values.dtype))

    def checkpointable(self) -> Tensor:
        """`values` marked as that range of the global flat tensor (DCP's `CheckpointableTensor` protocol)."""
        t = self.values
        t.global_shape, t.global_offsets = (self.total,), ((self.start,),)
        t.local_offsets, t.local_sizes = ((0,),), ((t.numel(),),)
        return t


@dataclass
class RoleState:
    """One role's part of a checkpoint on this process: its parameters' fp32 values and their optimizer states
    (`<name>.<state>`: Adam's moments, and its step count as a 1-element tensor), by the recipe's parameter names;
    its optimizer's own param groups with their parameters' names; and `finish`, which hands what a load wrote into
    the pieces to an engine that keeps it elsewhere (a collective call under ZeRO)."""
    weights: dict[str, Local]
    states: dict[str, Local]
    groups: list[dict[str, Any]]
    names: list[list[str]]
    finish: Callable[[], None] = field(default=lambda: None)

    def settings(self) -> list[dict[str, Any]]:
        """The param groups' hyper-parameters, each with its parameters' names in order (optimizer_groups.pt)."""
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                for g, names in zip(self.groups, self.names)]


def local_part(t: Tensor) -> Local:
    """This process's part of `t`: the rows an FSDP2 DTensor holds (sharded on its first dimension), or all of a
    plain tensor (which every process holds: DCP writes one copy)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return Local(0, t.numel(), t.detach().view(-1))
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(offset[1:]):
        raise ValueError("a DTensor sharded on another dimension than its first")
    row = math.prod(t.shape[1:])
    return Local(offset[0] * row if offset else 0, t.numel(), t.to_local().detach().view(-1))


def _optimizer(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)   # inside accelerate's AcceleratedOptimizer


def _initialised(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` with a state for every parameter (torch's DCP helper: one step with zero gradients at lr 0), so a
    checkpoint written before a role first stepped, and the tensors a checkpoint loads into, exist."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(opt)
    return opt


def torch_role(named: dict[str, nn.Parameter], optimizer: Any) -> RoleState:
    """A role trained by a torch optimizer (one process, DDP, FSDP2): views of its parameters and states."""
    opt = _initialised(_optimizer(optimizer))
    name = {id(p): k for k, p in named.items()}
    states = {f"{k}.{key}": local_part(v) for k, p in named.items() for key, v in opt.state[p].items()}
    return RoleState({k: local_part(p) for k, p in named.items()}, states, opt.param_groups,
                     [[name[id(p)] for p in g["params"]] for g in opt.param_groups])


def run_state(roles: dict[str, RoleState], extra: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors DCP writes and reads in place, by names that do not depend on how the networks are wrapped or
    sharded: `trainable.<role>.<name>` for the parameters, `optim.<role>.<name>.<state>` for their optimizer
    states, and `<group>.<key>` for the other tensors in `extra` (a target network, the EMA's shadow weights).
    A process holding no element of a tensor leaves it out."""
    parts = {f"trainable.{role}.{k}": v for role, s in roles.items() for k, v in s.weights.items()}
    parts.update({f"optim.{role}.{k}": v for role, s in roles.items() for k, v in s.states.items()})
    parts.update({f"{group}.{k}": local_part(v) for group, state in extra.items() for k, v in state.items()})
    return {k: v.checkpointable() for k, v in parts.items() if v.values.numel()}


def save_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Every process writes its pieces of `tensors` into folder/shards (a collective call: all processes at once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))


def load_shards(folder: Path, roles: dict[str, RoleState], extra: dict[str, dict[str, Tensor]],
                settings: dict[str, list[dict[str, Any]]]) -> None:
    """Read folder/shards into this run's parameters, optimizer states and `extra` tensors in place (whatever
    engine holds them, and how), hand them to the engine (`RoleState.finish`), and give each role's optimizer its
    saved param-group settings (`settings`, from optimizer_groups.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not all(isinstance(groups, list) for groups in settings.values()):
        raise ValueError("it was written in the sharded format of fewstep before 2026-12-03 (tensors named by "
                         "module); resume it with that version")
    for role, state in roles.items():
        if state.names != [g["params"] for g in settings.get(role, [])]:
            raise ValueError(f"the {role}'s optimizer holds other parameters than the checkpoint's")
    dcp.load(run_state(roles, extra), storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))
    for role, state in roles.items():
        _hand_over(state, settings[role])


def _hand_over(state: RoleState, saved_groups: list[dict[str, Any]]) -> None:
    """After a load: the engine takes the loaded values (`RoleState.finish`) and the optimizer its saved param-group
    settings."""
    state.finish()
    for group, saved in zip(state.groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})


def load_full(roles: dict[str, RoleState], extra: dict[str, dict[str, Tensor]],
              weights: dict[str, dict[str, Tensor]], optimizers: dict[str, dict[str, Any]],
              saved_extra: dict[str, dict[str, Tensor]]) -> None:
    """Load a checkpoint of full tensors (1 process or DDP wrote it: the weights by role and name, torch optimizer
    state dicts, `extra`'s groups whole) into a run whose engine spreads the state over its processes: each process
    copies its own ranges out of the whole tensors, then hands them to the engine (`RoleState.finish`)."""
    for role, state in roles.items():
        saved = optimizers[role]
        if [len(n) for n in state.names] != [len(g["params"]) for g in saved["param_groups"]]:
            raise ValueError(f"the {role}'s optimizer holds other parameters than the checkpoint's")
        for k, part in state.weights.items():
            part.fill(weights[role][k])
        for i, name in enumerate(n for names in state.names for n in names):
            for key, value in saved["state"].get(i, {}).items():
                if f"{name}.{key}" in state.states:   # ZeRO-1/2: parameters outside this process's slice have none
                    state.states[f"{name}.{key}"].fill(torch.as_tensor(value, dtype=torch.float32))
        _hand_over(state, saved["param_groups"])
    for group, tensors in extra.items():
        for k, t in tensors.items():
            local_part(t).fill(saved_extra[group][k])


def read_flat(folder: Path) -> dict[str, Tensor]:
    """Every tensor of folder/shards whole and flat (1 process; to inspect or compare a checkpoint), by its name in
    the checkpoint (`run_state`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder / SHARDS))
    sizes = {k: m.size for k, m in reader.read_metadata().state_dict_metadata.items()}
    out = {k: torch.zeros(size, dtype=torch.float32) for k, size in sizes.items()}
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)), no_dist=True)
    return out


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
