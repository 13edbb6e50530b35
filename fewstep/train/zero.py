"""DeepSpeed ZeRO under fewstep's trainer, through accelerate's DeepSpeed integration: stage 2 (optimizer states
and gradients partitioned across processes, parameters replicated) and stage 3 (parameters partitioned too).

What fewstep adds to what accelerate does:
- the DeepSpeed config is completed from the run's own settings (`data.batch_size` per process,
  `train.gradient_accumulation_steps`, `train.grad_clip`), and a value that contradicts them is refused in one line
  (accelerate would warn and silently take DeepSpeed's value);
- checkpoints are written by every process: its range of each parameter's fp32 master values and Adam moments,
  read straight from DeepSpeed's partitions (`role_state`) and written through torch.distributed.checkpoint in
  the flat per-parameter layout FSDP2's checkpoints use (`fewstep.train.shards`), so nothing is gathered, a ZeRO
  checkpoint resumes on any world size and engine (and 1-process or FSDP2 checkpoints resume under ZeRO), and
  nothing is read with a pickle loader (DeepSpeed's own checkpoints are pickles);
- the export gathers the fp32 masters of the trained parameters one at a time (`full_module`), not the module's
  own copies, which bf16 mixed precision rounds;
- stage 3: models load whole (`load_whole`: the frozen networks are never given to DeepSpeed), the trainer gathers
  partitioned parameters where it reads or writes them outside a forward (`gathered`: EMA, the recipe's
  after-step hook) and gathers the export network one parameter at a time into a weightless
  copy on the main process (`full_module`), and every process runs the preview's forwards (each forward gathers).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.train.shards import Local, RoleState

MOMENTS = ("exp_avg", "exp_avg_sq")   # AdamW's per-parameter states beside its step count


def is_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def partitioned(accelerator: Any) -> bool:
    """ZeRO stage 3: each process holds only its partition of the trained networks' parameters (outside a forward
    a parameter has no elements; its `ds_shape` is the full shape)."""
    return is_deepspeed(accelerator) and int(accelerator.state.deepspeed_plugin.zero_stage) == 3


@contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned `params` hold their whole values on every process (a collective
    call). With `modify`, what the main process wrote into them is partitioned again on exit (every process should
    write the same); without it, writes are dropped. Parameters that are not partitioned pass through."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = [p for p in params if hasattr(p, "ds_id")]
    with GatheredParameters(params, modifier_rank=0 if modify else None, enabled=bool(params)):
        yield


def full_module(net: nn.Module, skeleton: nn.Module, is_main: bool) -> nn.Module | None:
    """`skeleton` (a weightless copy of `net` from before `prepare`) holding `net`'s whole weights on the main
    process, gathered one parameter at a time so no process ever holds the whole network twice: the fp32 masters
    of the trained parameters (the module's own copies are rounded to bf16 under bf16 mixed precision), the module's
    values of the others. A collective call; other processes get None."""
    from deepspeed.utils import safe_get_full_fp32_param

    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    state: dict[str, Tensor] = {}
    for key in net.state_dict():
        if key in params:
            p = params[key]
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is None:
                with gathered([p]):
                    if is_main:
                        state[key] = p.detach().cpu().clone()
            elif is_main:
                state[key] = master.detach().cpu().clone()
        elif is_main:
            state[key] = buffers[key].detach().cpu().clone()
    if not is_main:
        return None
    skeleton.load_state_dict(state, assign=True)
    return skeleton


def set_masters(params: list[nn.Parameter], values: list[Tensor]) -> None:
    """Write whole `values` into the fp32 masters of `params` (what the optimizer steps, and what the export and
    checkpoints read), as `apply_ema` does after copying the EMA's weights into the module. Collective."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, v in zip(params, values):
        safe_set_full_fp32_param(p, v.to(p.device, torch.float32))


def _match(ds: dict[str, Any], key: str, value: Any, setting: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif float(current) != float(value):
        raise FewstepError(f"the DeepSpeed config's {key}: {current} contradicts {setting}={value}; set one to the "
                           f"other, or {key}: auto in the accelerate config")


def configure(ds: dict[str, Any], batch_size: int, accumulation: int, grad_clip: float) -> None:
    """Complete (or refuse) DeepSpeed config `ds` in place for a run with these settings, before `prepare`."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        raise FewstepError("DeepSpeed without ZeRO (stage 0) adds nothing to DDP here; launch with "
                           "recipes/accelerate/ddp.yaml or set zero_stage: 2")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FewstepError(f"the DeepSpeed config sets its own {key}; fewstep builds AdamW and its schedule from "
                               f"train.* (lr, betas, adam_eps, lr_schedule): remove the {key} section")
    _match(ds, "train_micro_batch_size_per_gpu", int(batch_size), "data.batch_size")
    _match(ds, "gradient_accumulation_steps", int(accumulation), "train.gradient_accumulation_steps")
    _match(ds, "gradient_clipping", float(grad_clip or 0.0), "train.grad_clip")


def load_whole(accelerator: Any) -> None:
    """Before the models load: no `deepspeed.zero.Init` in transformers' `from_pretrained`, whatever
    `zero3_init_flag` says. The frozen text encoders and VAE (and under a full student the teacher's own UNet or
    transformer) are never given to DeepSpeed, so parameters partitioned while loading would never be gathered
    again; ZeRO-3 partitions the trained network in `prepare` (under a LoRA student the base network holding the
    adapters, whose teacher forwards then gather like the student's). (accelerate's `zero3_init_context_manager(enable=False)`
    registers a stage-3 config with transformers again, which then partitions anyway.) The registration stays off
    for the run: diffusers' EMAModel would otherwise gather the parameters itself, inside the trainer's own
    gathering (`gathered`), which DeepSpeed refuses."""
    if is_deepspeed(accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def engine(accelerator: Any) -> Any:
    """The DeepSpeed engine accelerate built in `prepare`."""
    return accelerator.deepspeed_engine_wrapped.engine


def _zero(opt: Any) -> Any:
    """The DeepSpeed ZeRO optimizer inside accelerate's optimizer wrapper."""
    zero = getattr(opt, "optimizer", opt)
    if len(zero.optimizer.param_groups) != 1:
        raise FewstepError("a role under DeepSpeed has several optimizer param groups; fewstep gives each role one")
    return zero


def _flats(zero: Any) -> list[Tensor]:
    """The flat fp32 partitions that key the base optimizer's states: ZeRO-3 keeps them aside (its optimizer's
    group lists one only while it steps it), ZeRO-1/2 in the param group."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flats) if flats is not None else list(zero.optimizer.param_groups[0]["params"])


def _step(base: Any, n: float) -> Any:
    """An optimizer step count in `base`'s own form: torch's AdamW keeps a float tensor, DeepSpeedCPUAdam (which
    accelerate puts in place of AdamW when the optimizer is offloaded to the CPU) an int."""
    return int(n) if type(base).__name__ == "DeepSpeedCPUAdam" else torch.tensor(float(n))


def _states_exist(zero: Any) -> None:
    """Adam states for every flat partition (zero moments, step 0: what a role that has not stepped behaves like),
    linked to the parameters' fragments (ZeRO-1/2 link them lazily), so a checkpoint can read and write them."""
    base = zero.optimizer
    for flat in _flats(zero):
        if not base.state.get(flat):
            base.state[flat] = {"step": _step(base, 0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()


def role_state(named: dict[str, nn.Parameter], opt: Any) -> RoleState:
    """This process's part of a role's checkpoint under ZeRO (`shards.RoleState`): of each parameter, the range
    of its flattened elements that this process's fp32 master partition holds, and the same range of Adam's
    moments; nothing is gathered. ZeRO-3 partitions each parameter into equal slices of its padded flat form
    (`ds_tensor`); ZeRO-1/2 each process's slice of the flat param group holds one range of some parameters
    (`_hp_mapping`). `finish` (after a load; collective) writes the loaded values back where DeepSpeed keeps them
    (ZeRO-3's local-state API, which also copies to and from an offload device) and refreshes the module's own
    copies from the fp32 masters (ZeRO-3: each partition; ZeRO-1/2: `update_lp_params`, an all-gather)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    zero = _zero(opt)
    base, flats = zero.optimizer, _flats(zero)
    _states_exist(zero)
    step = {k: Local(0, 1, torch.tensor([float(base.state[flats[0]]["step"])])) for k in named}
    weights: dict[str, Local] = {}
    states: dict[str, Local] = {f"{k}.step": v for k, v in step.items()}
    stage3 = any(hasattr(p, "ds_id") for p in named.values())
    for k, p in named.items():
        if stage3:   # elements [rank * size, (rank + 1) * size) of the padded flat parameter
            size = p.ds_tensor.ds_numel
            start = size * torch.distributed.get_rank(group=p.ds_process_group)
            valid = max(0, min(size, p.ds_numel - start))
            weights[k] = Local(start, p.ds_numel, safe_get_local_fp32_param(p)[:valid])
            states.update({f"{k}.{m}": Local(start, p.ds_numel, safe_get_local_optimizer_state(p, m)[:valid])
                           for m in MOMENTS})
        elif p._hp_mapping is not None:
            frag = p._hp_mapping
            start = frag.lp_fragment_address.start
            weights[k] = Local(start, p.numel(), frag.hp_fragment)
            states.update({f"{k}.{m}": Local(start, p.numel(), frag.get_optim_state_fragment(m)) for m in MOMENTS})

    def finish() -> None:
        if stage3:
            for k, p in named.items():
                master = _padded(weights[k].values, p.ds_tensor.ds_numel)
                safe_set_local_fp32_param(p, master)
                for m in MOMENTS:
                    safe_set_local_optimizer_state(p, _padded(states[f"{k}.{m}"].values, p.ds_tensor.ds_numel), m)
                with torch.no_grad():
                    p.ds_tensor.copy_(master.to(p.ds_tensor.device, p.ds_tensor.dtype))
        else:
            zero.update_lp_params()
        for flat in flats:
            base.state[flat]["step"] = _step(base, float(next(iter(step.values())).values))

    group = base.param_groups[0]
    return RoleState(weights, states, [group], [list(named)], finish)


def _padded(values: Tensor, size: int) -> Tensor:
    """A partition's values with the zero padding ZeRO-3 keeps after the flat parameter's last element."""
    return values if values.numel() == size else torch.cat([values, values.new_zeros(size - values.numel())])
