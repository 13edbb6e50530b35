"""DeepSpeed ZeRO stages 1 and 2 under fewstep's trainer (optimizer states and gradients partitioned across
processes, parameters replicated), through accelerate's DeepSpeed integration.

Two things fewstep adds to what accelerate does:
- the DeepSpeed config is completed from the run's own settings (`data.batch_size` per process,
  `train.gradient_accumulation_steps`, `train.grad_clip`), and a value that contradicts them is refused in one line
  (accelerate would warn and silently take DeepSpeed's value);
- checkpoints hold the optimizer states in the same per-parameter format a 1-process run writes (torch's AdamW
  state dict, gathered from the partitions with DeepSpeed's tensor-fragment API), so a ZeRO checkpoint resumes on
  any world size and engine, nothing is read with a pickle loader (DeepSpeed's own checkpoints are pickles), and
  the export is the same as without DeepSpeed.
Stage 3 (partitioned parameters) is refused: fsdp2.yaml shards parameters the same way and is tested here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError

MOMENTS = ("exp_avg", "exp_avg_sq")   # AdamW's per-parameter states beside its step count


def is_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


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
    if stage > 2:
        raise FewstepError(f"DeepSpeed ZeRO stage {stage} partitions the parameters, which fewstep's trainer does not "
                           "support; launch with recipes/accelerate/fsdp2.yaml (the same sharding) or "
                           "recipes/accelerate/deepspeed-zero2.yaml")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FewstepError(f"the DeepSpeed config sets its own {key}; fewstep builds AdamW and its schedule from "
                               f"train.* (lr, betas, adam_eps, lr_schedule): remove the {key} section")
    _match(ds, "train_micro_batch_size_per_gpu", int(batch_size), "data.batch_size")
    _match(ds, "gradient_accumulation_steps", int(accumulation), "train.gradient_accumulation_steps")
    _match(ds, "gradient_clipping", float(grad_clip or 0.0), "train.grad_clip")


def engine(accelerator: Any) -> Any:
    """The DeepSpeed engine accelerate built in `prepare`."""
    return accelerator.deepspeed_engine_wrapped.engine


def _zero(opt: Any) -> Any:
    """The DeepSpeed ZeRO optimizer inside accelerate's optimizer wrapper."""
    zero = getattr(opt, "optimizer", opt)
    if len(zero.optimizer.param_groups) != 1:
        raise FewstepError("a role under DeepSpeed has several optimizer param groups; fewstep gives each role one")
    return zero


def full_weights(params: list[nn.Parameter]) -> list[Tensor]:
    """The fp32 master values of `params` (what DeepSpeed's optimizer updates; the module's own copies are rounded
    to bf16 under bf16 mixed precision), gathered whole from the partitions. Collective: call it on every process."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().cpu().clone() for p in params]


def full_state_dict(opt: Any, params: list[nn.Parameter]) -> dict[str, Any]:
    """torch's AdamW state dict of `params` (the order the role's optimizer was built with), every moment gathered
    whole from the processes' partitions: what `AdamW.state_dict()` gives in a 1-process run. Collective: call it
    on every process."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _zero(opt).optimizer
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    flats = base.param_groups[0]["params"]
    state: dict[int, dict[str, Tensor]] = {}
    if any(base.state.get(f) for f in flats):   # the role has stepped
        step = base.state[flats[0]]["step"]
        for i, p in enumerate(params):
            state[i] = {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone()
                                                 for k in MOMENTS}}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def load_full_state(opt: Any, params: list[nn.Parameter], weights: list[Tensor], saved: dict[str, Any]) -> None:
    """Load full fp32 `weights` of `params` and a torch AdamW state dict of them (any world size or engine wrote
    them) into this process's part of DeepSpeed's optimizer: its fp32 master partition and its optimizer states
    (the caller has loaded the weights into the module's own copies, `params`)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero(opt)
    base = zero.optimizer
    if len(saved["param_groups"]) != 1 or len(saved["param_groups"][0]["params"]) != len(params):
        raise FewstepError("the checkpoint's optimizer holds other parameters than this run's role; resume with the "
                           "settings it was written with")
    base.param_groups[0].update({k: v for k, v in saved["param_groups"][0].items() if k != "params"})
    for p, w in zip(params, weights):
        safe_set_full_fp32_param(p, w.to(p.device, torch.float32))
    if not saved["state"]:
        return
    for flat in base.param_groups[0]["params"]:   # a role that has not stepped has no state to write into yet
        if not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    zero._lazy_init_hp_params_optimizer_state()   # link the parameters to those states (DeepSpeed does it lazily)
    for i, p in enumerate(params):
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, saved["state"][i][k].to(p.device), k)
    for flat in base.param_groups[0]["params"]:
        base.state[flat]["step"] = saved["state"][0]["step"].clone()
