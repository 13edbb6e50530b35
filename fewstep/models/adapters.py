"""Several LoRA adapters on one frozen base: the teacher (no adapter), the student ("default") and the critic
("critic") share a single copy of the weights, and each call switches which adapter is live.

peft's public switches (`set_adapter`, `enable_adapters`) also rewrite `requires_grad` on every adapter, which
would silently freeze one role's parameters while another role is called; two-time-scale training owns disjoint
adapters of one base with separate optimizers, so the switch here flips only the layers' live-adapter state.

Phased students switch experts by time (`ExpertSwitch`); an expert is a LoRA adapter on the shared network or a
network of its own (full-copy experts), so samplers never care which.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

from torch import Tensor, nn

STUDENT = "default"
CRITIC = "critic"


def enable_checkpointing(net: nn.Module) -> None:
    """Gradient checkpointing whose recomputation sees the adapters that were live in the block's forward.

    diffusers' default recomputes a block in the backward pass with whatever adapter is live *then*: on a base
    shared by several roles (student and critic adapters, phase experts) the critic's blocks were recomputed with
    the student's adapter (DMD2: silently wrong critic gradients) and a phase expert's with another phase's
    (an error). Here each checkpointed block records its LoRA layers' live state and recomputes under it."""
    import torch.utils.checkpoint as cp

    def checkpoint(module: nn.Module, *args: object) -> object:
        layers = tuner_layers(module)
        state = [(list(m._active_adapter), m._disable_adapters) for m in layers]
        return cp.checkpoint(module.__call__, *args, use_reentrant=False,
                             context_fn=lambda: (nullcontext(), _layer_state(layers, state)))

    net.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


@contextmanager
def _layer_state(layers: list[nn.Module], state: list[tuple[list[str], bool]]) -> Iterator[None]:
    """Within the block each LoRA layer has the given (active adapters, disabled) state; restored after."""
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m, (active, disabled) in zip(layers, state):
        m._active_adapter, m._disable_adapters = active, disabled
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def live_adapter(net: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block only adapter `name` is applied (None: no adapter, the frozen base)."""
    layers = tuner_layers(net)
    with _layer_state(layers, [(m._active_adapter if name is None else [name], name is None) for m in layers]):
        yield


class WithAdapter(nn.Module):
    """A denoiser evaluated with one adapter of its network live (None = the base, i.e. the teacher)."""

    def __init__(self, denoiser: nn.Module, name: str | None) -> None:
        super().__init__()
        self.denoiser, self.name = denoiser, name

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with live_adapter(self.denoiser.net, self.name):
            return self.denoiser(x_t, t, cond)


def expert_network(net: nn.Module, name: str) -> nn.Module | None:
    """The network of expert `name` when `net` holds one network per phase (an nn.ModuleDict keyed by expert
    name, full-copy Phased DMD students, algorithms.md §4.1), else None: the expert is a LoRA adapter on `net`."""
    return net[name] if isinstance(net, nn.ModuleDict) and name in net else None


def rebind(denoiser: nn.Module, net: nn.Module) -> nn.Module:
    """The same denoiser convention (schedule, prediction, call glue, autocast) around another network."""
    from fewstep.models.denoiser import Denoiser

    return Denoiser(net, denoiser.schedule, denoiser.prediction, call=denoiser.call,
                    autocast_dtype=denoiser.autocast_dtype)


def expert_denoiser(denoiser: nn.Module, key: str | nn.Module) -> nn.Module:
    """One phase expert as a denoiser: its own network (given, or found by name in `denoiser.net`) run with the
    denoiser's convention, or a LoRA adapter `key` live on the shared network."""
    net = key if isinstance(key, nn.Module) else expert_network(denoiser.net, key)
    return WithAdapter(denoiser, key) if net is None else rebind(denoiser, net)


class ExpertSwitch(nn.Module):
    """Phased students (algorithms.md §4.1): the expert of the phase that owns time t. experts = [(expert, bound)]
    from high noise to low, an expert being a LoRA adapter name on `denoiser.net` or a separate network (see
    `expert_denoiser`); a step at time t uses the first expert whose bound lies below t (the last bound is 0)."""

    def __init__(self, denoiser: nn.Module, experts: list[tuple[str | nn.Module, float]]) -> None:
        super().__init__()
        self.denoiser, self.experts = denoiser, list(experts)
        self.calls = nn.ModuleList([expert_denoiser(denoiser, key) for key, _ in self.experts])

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def expert_index(self, t: float) -> int:
        return next((i for i, (_, bound) in enumerate(self.experts) if t > bound + 1e-9), len(self.experts) - 1)

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.calls[self.expert_index(float(t.reshape(-1)[0]))](x_t, t, cond)


def adapter_parameters(net: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of one adapter (peft names them `...lora_A.<name>.weight`)."""
    return {n: p for n, p in net.named_parameters() if f".{name}." in n and "lora_" in n}


def add_named_adapter(net: nn.Module, name: str, rank: int, alpha: float, targets: list[str]) -> dict[str, nn.Parameter]:
    """A LoRA adapter `name` on `net`, trainable, without changing which adapter is live elsewhere or any other
    parameter's requires_grad (diffusers' `add_adapter` would make the new adapter live and freeze the others).
    Layers the new adapter adds start switched off, so plain calls still run the base (or the student's adapter)."""
    from peft import inject_adapter_in_model

    from fewstep.models.lora import lora_config
    from fewstep.models.student import check_lora_targets, fp32_trainable

    check_lora_targets(net, targets)
    before = {id(m): (m._active_adapter, m._disable_adapters) for m in tuner_layers(net)}
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    config = lora_config(targets, rank, alpha)
    if hasattr(net, "add_adapter"):
        net.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, net, name)
    for n, p in net.named_parameters():
        p.requires_grad_(grads.get(n, False))
    for m in tuner_layers(net):
        m._active_adapter, m._disable_adapters = before.get(id(m), ([name], True))
    for p in adapter_parameters(net, name).values():
        p.requires_grad_(True)
    fp32_trainable(net)   # replaces half-precision Parameters: collect them afterwards
    return adapter_parameters(net, name)
