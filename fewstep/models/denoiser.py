"""Every teacher, student and critic is a denoiser D(x_t, t, cond) -> x0 in float32 (architecture.md §0.1).

`Denoiser` is the only place that knows a network's prediction type and timestep units; the family object
supplies the call glue. `Guided` adds classifier-free guidance by composition.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from fewstep.diffusion.param import cfg, to_x0
from fewstep.diffusion.schedule import Schedule, bcast

Cond = dict[str, Tensor]
NetCall = Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]


def default_call(net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
    return net(x, timestep, **cond).sample


class Denoiser(nn.Module):
    """A diffusers network as D(x_t, t, cond) -> x0 (float32). t is a [B] tensor in [0, 1]."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str, call: NetCall = default_call,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.net, self.schedule, self.prediction, self.call = net, schedule, prediction, call
        self.autocast_dtype = autocast_dtype

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        alpha, sigma = (bcast(v, x_t.float()) for v in self.schedule.alpha_sigma(t))
        timestep = self.schedule.model_timestep(t).to(x_t.device, non_blocking=True)
        with _autocast(x_t.device, self.autocast_dtype):
            out = self.call(self.net, x_t.to(self.dtype), timestep, cond)
        return to_x0(out.float(), x_t.float(), alpha, sigma, self.prediction)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=dtype)


def concat_cond(a: Cond, b: Cond) -> Cond:
    """Stack two conditions along the batch (batched CFG: one forward for uncond and cond)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def paired_cond(pos: Cond, neg: Cond) -> dict[str, Cond]:
    """The condition `Guided` takes, with the stacked [neg; pos] batch built once for a whole sampling loop
    (as pipelines concatenate prompt embeddings once) instead of at every step."""
    return {"pos": pos, "neg": neg, "both": concat_cond(neg, pos)}


class Guided(nn.Module):
    """Classifier-free guidance as a wrapper: D_w = D(∅) + w (D(c) - D(∅)) (Ho & Salimans 2022, Eq. 6).

    `cond` must hold "pos" and "neg" conditions (and may hold their stacked "both", see `paired_cond`); both run in
    one batched forward. `scale` is a float or a [B] tensor in the Imagen/diffusers convention (1 = off, and then
    only the positive branch runs).
    """

    def __init__(self, denoiser: nn.Module, scale: float | Tensor) -> None:
        super().__init__()
        self.denoiser, self.scale = denoiser, scale

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Cond]) -> Tensor:
        if isinstance(self.scale, (int, float)) and self.scale == 1.0:
            return self.denoiser(x_t, t, cond["pos"])
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        stacked = cond["both"] if "both" in cond else concat_cond(cond["neg"], cond["pos"])
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), stacked)
        neg, pos = both.chunk(2)
        scale = bcast(torch.as_tensor(self.scale), pos) if torch.is_tensor(self.scale) else self.scale
        return cfg(neg, pos, scale)
