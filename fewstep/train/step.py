"""One training iteration of any recipe on accelerate's engine, apart from the run around it (data, checkpoints,
logging): one AdamW and LR schedule per trainable role, each prepared by `accelerator.prepare` with the networks
the roles train; the summed losses back-propagated once per micro-step by `accelerator.backward` inside
`accelerator.accumulate` (no gradient sync on the micro-steps that do not step); each role that produced a loss
clipped by `accelerator.clip_grad_norm_` and stepped when its gradient is finite; then the recipe's after-step hook.
The trainer calls exactly this; the analytic-teacher tests call it with closed-form teachers and no pipeline.

Gradients are averaged by the engine (DDP's bucketed all-reduce, overlapped with the backward pass), never by
hand. Two roles may share one network (student and critic as two LoRA adapters on one frozen base): it is
prepared once, and each role's optimizer owns only its adapter's parameters.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.recipes.base import Batch, Recipe
from fewstep.sampling.draws import Draws
from fewstep.train import zero
from fewstep.train.checkpoint import fault_point
from fewstep.train.shards import RoleState, collective_forwards, is_sharded, meta_copy, torch_role, unsharded


def trained_networks(modules: list[nn.Module]) -> list[nn.Module]:
    """The distinct networks the roles train, each to be prepared (wrapped) once: every outermost diffusers model
    inside a role's module that holds a trainable parameter (one UNet carrying two LoRA adapters counts once; a
    ModuleDict of expert copies gives each copy), and every outermost module that holds trainable parameters but
    no diffusers model (DMD2's GAN head; plain torch networks in the analytic tests)."""
    found: dict[int, nn.Module] = {}
    for module in modules:
        for net in _networks(module):
            found.setdefault(id(net), net)
    return list(found.values())


def _networks(module: nn.Module) -> list[nn.Module]:
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin) or not any(isinstance(m, ModelMixin) for m in module.modules()):
        return [module] if any(p.requires_grad for p in module.parameters()) else []
    return [net for child in module.children() for net in _networks(child)]


def route(net: nn.Module, runner: nn.Module) -> None:
    """Make every call of `net`, from wherever it is held (denoisers, adapters, expert switches), go through
    `runner`, the engine's wrapper of it (DDP), whose forward arms the gradient all-reduce; the wrapper's own call
    of `net` runs the network. Like accelerate's mixed-precision forward, this sets the instance's `forward`."""
    inner = net.forward
    inside = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        if inside:
            return inner(*args, **kwargs)
        inside = True
        try:
            return runner(*args, **kwargs)
        finally:
            inside = False

    net.forward = forward


def _full(t: Tensor) -> Tensor:
    """A DTensor's global value (a gradient norm under FSDP2); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def linked(n: int, spans: list[set[int]]) -> list[list[int]]:
    """Networks 0..n-1 grouped so that each span (the networks one role trains) lies in one group: the
    connected components, each sorted, in order of their first network."""
    group = list(range(n))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for span in spans:
        first, *rest = sorted(span)
        for j in rest:
            group[root(j)] = root(first)
    found: dict[int, list[int]] = {}
    for i in range(n):
        found.setdefault(root(i), []).append(i)
    return list(found.values())


class Joint(nn.Module):
    """Networks that one role trains together (DMD2's critic and its GAN head) as the one model accelerate's FSDP2
    `prepare` takes per call. Each member's class is among the blocks FSDP2 wraps, so every member is an FSDP unit
    of its own and gathers its weights when the recipe calls it directly, as it does without sharding."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        blocks = [b for m in members for b in (getattr(m, "_no_split_modules", None) or [])]
        self._no_split_modules = list(dict.fromkeys([*blocks, *(type(m).__name__ for m in members)]))


def keep_root_gathered(net: nn.Module) -> None:
    """Keep the weights of FSDP2 network `net`'s root unit (those outside its blocks: embeddings, the first and
    last layers) gathered from its forward to its backward, which is torch's default for a root and which an
    explicit `reshard_after_forward: true` in the launch config undoes. A recipe may back-propagate through a
    forward whose output it does not use (DMD2's GAN head reads the critic's bottleneck features): no hook then
    gathers the root's weights again for the backward pass, and it would read freed memory."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(net, FSDPModule):
        net.set_reshard_after_forward(False, recurse=False)


def _with_block_names(accelerator: Any, model: nn.Module) -> nn.Module:
    """`model`, with accelerate's FSDP2 plugin told which of its block classes to wrap: the plugin keeps the
    first model's `_no_split_modules` for every later `prepare` and fails on a model without those classes (a
    GAN head after a UNet). The names a launch config gives are kept where this model has them."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    plugin = accelerator.state.fsdp_plugin
    if not hasattr(plugin, "_fewstep_names"):   # what the launch config said, before any prepare filled it in
        plugin._fewstep_names = plugin.transformer_cls_names_to_wrap
    names = plugin._fewstep_names or getattr(model, "_no_split_modules", None) or []
    plugin.transformer_cls_names_to_wrap = [b for b in names if get_module_class_from_name(model, b) is not None]
    return model


def _engine(accelerator: Any) -> str:
    """"FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU", "NO", ... (accelerate's distributed type)."""
    return str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]


def check_engine(accelerator: Any, networks: list[nn.Module], params: dict[str, dict[str, nn.Parameter]]) -> None:
    """Engine settings fewstep cannot honour, refused before anything is wrapped: DeepSpeed with more than one
    trained role (accelerate gives one DeepSpeed engine per model, and the roles here step separately from one
    backward pass), and FSDP's own activation checkpointing on a network that two roles share (it recomputes a
    block under whichever LoRA adapter is live in the backward pass; fewstep's adapter-aware recompute,
    student.gradient_checkpointing=true, is the one to use)."""
    kind = _engine(accelerator)
    if kind == "DEEPSPEED" and (len(params) > 1 or len(networks) > 1):
        raise FewstepError(f"DeepSpeed runs recipes with one trained role and network (lcm); this one trains "
                           f"{sorted(params)} in {len(networks)} network(s): launch it with "
                           "recipes/accelerate/fsdp2.yaml (ZeRO-3-like sharding) instead")
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if kind == "FSDP" and plugin is not None and getattr(plugin, "activation_checkpointing", False):
        home = {id(p): i for i, net in enumerate(networks) for p in net.parameters()}
        spans = [{home[id(p)] for p in named.values() if id(p) in home} for named in params.values()]
        shared = [net for i, net in enumerate(networks) if sum(i in span for span in spans) > 1]
        if shared:
            raise FewstepError(f"fsdp_activation_checkpointing recomputes {type(shared[0]).__name__} blocks under the "
                               "wrong LoRA adapter where two roles share it; set it to false in the accelerate config "
                               "and pass student.gradient_checkpointing=true")
        wide = next((sorted(span) for span in spans if len(span) > 1), None)
        if wide:   # a role training two networks is prepared as one Joint, which FSDP's recompute cannot wrap
            names = " and ".join(type(networks[i]).__name__ for i in wide)
            raise FewstepError(f"fsdp_activation_checkpointing cannot wrap {names}, which one role trains together; "
                               "set it to false in the accelerate config and pass student.gradient_checkpointing=true")


class RoleOptimizers:
    """AdamW + LR schedule per role of `recipe`, from the run's `train` settings (lr, betas, adam_eps, weight_decay,
    lr_schedule, warmup_steps, steps, grad_clip, gradient_accumulation_steps) and the recipe's per-role overrides,
    prepared with the role networks by `accelerator`. A prepared network that came back wrapped (DDP) is routed:
    every denoiser around it calls the wrapper, so its forward passes arm the gradient all-reduce."""

    def __init__(self, recipe: Recipe, train: Any, accelerator: Any) -> None:
        from diffusers.optimization import get_scheduler

        self.acc, self.grad_clip = accelerator, float(train.grad_clip or 0)
        accelerator.gradient_accumulation_steps = int(train.gradient_accumulation_steps)
        accelerator.step_scheduler_with_optimizer = False   # schedules count optimizer steps at any world size
        roles = recipe.trainable()
        self.params: dict[str, dict[str, nn.Parameter]] = {r: recipe.parameters(r) for r in roles}
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, Any] = {}
        for role, named in self.params.items():     # captured once: roles may share a net
            if not named:
                raise FewstepError(f"role {role!r} has no trainable parameters; check student.mode / LoRA targets")
            settings = {"lr": train.lr, "betas": tuple(train.betas), "eps": train.adam_eps,
                        "weight_decay": train.weight_decay,
                        **recipe.optimizer_settings(role)}
            self.optimizers[role] = torch.optim.AdamW(list(named.values()), **settings)
            self.schedulers[role] = get_scheduler(train.lr_schedule, self.optimizers[role],
                                                  num_warmup_steps=train.warmup_steps, num_training_steps=train.steps)
        self.networks = trained_networks(list(roles.values()))
        check_engine(accelerator, self.networks, self.params)
        sharding = _engine(accelerator) == "FSDP"
        self.partitioned = zero.partitioned(accelerator)   # ZeRO-3: parameters partitioned in `prepare`
        self.followers = recipe.followers() if sharding else []   # unsharded copies need no engine
        where = {id(p): (i, name) for i, net in enumerate(self.networks) for name, p in net.named_parameters()}
        loose = [f"{r}:{n}" for r, named in self.params.items() for n, p in named.items() if id(p) not in where]
        if loose:   # a recipe bug: these would train without being synchronised across processes
            raise FewstepError(f"trainable parameters outside every role module: {loose[:3]}; return their module "
                               "from Recipe.trainable()")
        # FSDP2 shards the networks in place, ZeRO keeps fp32 masters aside: weightless copies to gather the export
        # into (see shards.unsharded, zero.full_module)
        self.skeletons = [meta_copy(net) for net in self.shardable] if sharding or zero.is_deepspeed(accelerator) \
            else []
        self.prepared = self._prepare(accelerator, where) if not sharding else self._prepare_sharded(accelerator, where)
        for net, wrapped in zip(self.networks, self.prepared):
            if wrapped is not net:
                route(net, wrapped)
        self._follow_resharded_parameters(where)

    def _prepare(self, accelerator: Any, where: dict[int, tuple[int, str]]) -> list[nn.Module]:
        """DDP (or one process): one `accelerator.prepare` of every network with every role's optimizer and
        schedule; the prepared networks, in order."""
        roles, n = list(self.params), len(self.networks)
        out = accelerator.prepare(*self.networks, *(self.optimizers[r] for r in roles),
                                  *(self.schedulers[r] for r in roles))
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        self.optimizers.update(zip(roles, out[n:n + len(roles)]))
        self.schedulers.update(zip(roles, out[n + len(roles):]))
        return out[:n]

    def _prepare_sharded(self, accelerator: Any, where: dict[int, tuple[int, str]]) -> list[nn.Module]:
        """FSDP2, whose `prepare` takes one model per call with the optimizers of its parameters: one call per
        group of networks that roles link (a role training two networks, as DMD2's critic with its GAN head,
        joins them in a `Joint`), then one call per follower without an optimizer. Every network is sharded in
        place, so the prepared networks are the networks themselves."""
        for group in linked(len(self.networks), [{where[id(p)][0] for p in named.values()}
                                                 for named in self.params.values()]):
            roles = [r for r, named in self.params.items() if where[id(next(iter(named.values())))][0] in group]
            model = self.networks[group[0]] if len(group) == 1 else Joint([self.networks[i] for i in group])
            out = accelerator.prepare(_with_block_names(accelerator, model), *(self.optimizers[r] for r in roles),
                                      *(self.schedulers[r] for r in roles))
            self.optimizers.update(zip(roles, out[1:1 + len(roles)]))
            self.schedulers.update(zip(roles, out[1 + len(roles):]))
        for net in self.networks:   # see keep_root_gathered
            keep_root_gathered(net)
        for net in self.followers:
            accelerator.prepare(_with_block_names(accelerator, net))
        return list(self.networks)

    def _follow_resharded_parameters(self, where: dict[int, tuple[int, str]]) -> None:
        """FSDP2 replaces a network's parameters by sharded ones in place: point every role's parameter dict (the
        trainer's, and the recipe's own where `parameters()` returns it) at the new objects, by name. Under DDP
        the parameters are the same objects and nothing changes."""
        current = [{name.replace("._checkpoint_wrapped_module", ""): p for name, p in net.named_parameters()}
                   for net in self.networks]
        for named in self.params.values():
            for key, p in list(named.items()):
                i, name = where[id(p)]
                if current[i][name] is not p:
                    named[key] = current[i][name]

    def reshard(self) -> None:
        """Put FSDP2 networks back into their sharded parameters. FSDP2 leaves the root module's parameters
        gathered after a forward (a backward usually follows); after a no-grad forward (the preview, a rollout)
        nothing would shard them again, and the optimizers and checkpoints would see other tensors than the module's."""
        from torch.distributed.fsdp import FSDPModule

        for net in self.shardable:
            for unit in net.modules():   # every FSDP unit: a block run on its own stays gathered too
                if isinstance(unit, FSDPModule):
                    unit.reshard()

    def export_network(self, net: nn.Module) -> nn.Module | None:
        """`net` (the recipe's export network) with full weights on the main process: itself, unless an engine
        sharded it (FSDP2) or holds its trained weights as fp32 masters (DeepSpeed), when those are gathered into
        an unsharded copy (a collective call; other processes get None)."""
        if zero.is_deepspeed(self.acc) and net in self.networks:
            return zero.full_module(net, self.skeletons[self.networks.index(net)], self.acc.is_main_process)
        if not self.sharded or net not in self.shardable:   # modules compare by identity
            return net
        self.reshard()
        return unsharded(net, self.skeletons[self.shardable.index(net)], self.acc.is_main_process)

    @property
    def shardable(self) -> list[nn.Module]:
        """The networks a sharding engine shards: the trained ones, then their followers."""
        return self.networks + self.followers

    @property
    def sharded(self) -> bool:
        """Whether the engine sharded the trained parameters (FSDP2: DTensors)."""
        return is_sharded(p for named in self.params.values() for p in named.values())

    @property
    def collective(self) -> bool:
        """Whether the trained parameters are spread over the processes (FSDP2 shards, ZeRO-3 partitions): each
        has one copy, and every forward through them is a collective call."""
        return collective_forwards(p for named in self.params.values() for p in named.values())

    @property
    def distributed(self) -> bool:
        return any(w is not n for n, w in zip(self.networks, self.prepared))

    @property
    def spread(self) -> bool:
        """Whether each process checkpoints its own part of the trained state: FSDP2 shards it, DeepSpeed ZeRO
        partitions the optimizer states (and under ZeRO-3 the parameters)."""
        return self.sharded or zero.is_deepspeed(self.acc)

    def role_state(self, role: str) -> RoleState:
        """This process's part of `role`'s parameters and optimizer states, for a checkpoint (`shards.RoleState`)."""
        if zero.is_deepspeed(self.acc):
            return zero.role_state(self.params[role], self.optimizers[role])
        return torch_role(self.params[role], self.optimizers[role])

    def load(self, role: str, weights: dict[str, Tensor], optimizer_state: dict[str, Any]) -> None:
        """Load full `weights` (checked against the role's parameters) and an optimizer state dict in torch's
        format into `role`, on one process or under DDP (engines that spread the state: `shards.load_full`)."""
        with torch.no_grad():
            for k, p in self.params[role].items():
                p.copy_(weights[k].to(p.device, p.dtype))
        self.optimizers[role].load_state_dict(optimizer_state)

    def whole(self, modify: bool = False) -> ContextManager:
        """Inside the block every role's trained parameters hold their whole values (ZeRO-3 partitions them; a
        collective call there, see `zero.gathered`); elsewhere nothing happens."""
        if not self.partitioned:
            return nullcontext()
        return zero.gathered([p for named in self.params.values() for p in named.values()], modify)

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def accumulate(self) -> ContextManager:
        """One micro-step: gradients are synchronised only on the micro-step that ends the iteration."""
        return self.acc.accumulate(*self.prepared)

    def backward(self, loss: Tensor) -> None:
        """`accelerator.backward` (it divides by the accumulation count). Under DDP every parameter the wrapped
        networks train enters the graph (with weight 0 where this iteration's losses do not reach it): the
        reducer, built without `find_unused_parameters` so that a network may run several forwards before one
        backward (a rollout, the critic, the GAN head), waits for a gradient of each of its parameters. (DeepSpeed's
        ZeRO reduces whatever gradients there are; under ZeRO-3 a parameter outside a forward holds no elements.)"""
        if self.distributed and not zero.is_deepspeed(self.acc):
            loss = loss + 0.0 * sum(p.reshape(-1)[0] for net in self.networks for p in net.parameters()
                                    if p.requires_grad)
        self.acc.backward(loss)

    def _clip(self, role: str, limit: float) -> float:
        """Clip `role`'s gradients; their norm before clipping. `accelerator.clip_grad_norm_`, except:
        - fp16: accelerate's clip unscales every prepared optimizer (its own TODO), which would unscale a second
          role's gradients twice, so the role unscales only its own optimizer, then torch's clip;
        - FSDP2: torch's clip, which takes DTensor gradients (accelerate's FSDP branch looks for a prepared model
          owning exactly these parameters, and a role may own a part of one network, or all of one of several)."""
        params = list(self.params[role].values())
        if self.scaled:
            self.acc.unscale_gradients(optimizer=self.optimizers[role])
        if self.scaled or _engine(self.acc) == "FSDP":
            return float(_full(torch.nn.utils.clip_grad_norm_(params, limit)))
        return float(self.acc.clip_grad_norm_(params, limit))

    @property
    def scaled(self) -> bool:
        """fp16: accelerate's GradScaler is on."""
        return getattr(self.acc, "scaler", None) is not None

    def step(self, role: str) -> tuple[float, bool]:
        """Clip and step `role` when its gradient norm is finite, then advance its schedule; a non-finite norm
        skips both. Under fp16 the optimizer always steps through the GradScaler, which itself skips a step with
        an overflow (and lowers the scale). Returns (the gradient norm before clipping, whether it stepped)."""
        if zero.is_deepspeed(self.acc):   # the engine clipped and stepped in accelerator.backward
            norm, stepped = self.acc.clip_grad_norm_(list(self.params[role].values()), self.grad_clip), \
                zero.engine(self.acc).was_step_applied()
            if stepped:
                self.schedulers[role].step()
            return (math.nan if norm is None else float(norm)), stepped
        norm, opt = self._clip(role, self.grad_clip or float("inf")), self.optimizers[role]
        if self.scaled:
            opt.step()
            stepped = not opt.step_was_skipped
        elif stepped := math.isfinite(norm):
            opt.step()
        if stepped:
            self.schedulers[role].step()
        return norm, stepped


def train_iteration(recipe: Recipe, optim: RoleOptimizers, batch: Callable[[int], Batch],
                    draws: Callable[[int], Draws], step: int,
                    autocast: Callable[[], ContextManager] = nullcontext) -> tuple[dict[str, float], set[str]]:
    """(mean losses and metrics over the micro-batches, plus grad_norm/<role>; the roles that stepped).
    `batch(i)` and `draws(i)` are micro-batch i of this iteration and its random draws."""
    accumulation = optim.acc.gradient_accumulation_steps
    optim.zero_grad()
    totals: dict[str, float] = {}
    stepped: set[str] = set()
    for micro in range(accumulation):
        with optim.accumulate():
            with autocast():
                out = recipe.train_step(batch(micro), step, draws(micro))
            optim.backward(sum(out.losses.values()))
        stepped.update(out.losses)
        for k, v in {**{f"loss/{r}": float(l.detach()) for r, l in out.losses.items()}, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accumulation
    fault_point("step", step)
    for role in (r for r in optim.params if r in stepped):   # one order on every process: clipping is collective
        totals[f"grad_norm/{role}"], moved = optim.step(role)   # under FSDP2 (a set's order differs per process)
        totals[f"skipped/{role}"] = float(not moved)   # a non-finite gradient: no step
    if optim.sharded:   # followers update from the sharded weights (a no-grad forward leaves a root gathered)
        optim.reshard()
    # the hook moves the followers (LCM's EMA target) towards the trained weights, which ZeRO-3 gathers first
    with optim.whole() if recipe.followers() else nullcontext():
        recipe.after_optimizer_step(step)
    return totals, stepped
