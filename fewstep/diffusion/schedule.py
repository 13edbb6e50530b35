"""Noise schedules in fewstep's one convention: x_t = alpha(t) * x0 + sigma(t) * eps, t in [0, 1], t = 0 clean.

Two families cover every supported teacher:
- `DiscreteVP`: DDPM tables (SD1.5, SDXL, PixArt), t = index / (N - 1) on diffusers' `alphas_cumprod`.
- `RectifiedFlow`: x_t = (1 - t) x0 + t eps (SD3, FLUX), t = sigma; static or dynamic time shift of the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


MEMO_MAX_NUMEL = 1024    # time tensors larger than this are not memoised (DiscreteVP.alpha_sigma)
MEMO_MAX_ENTRIES = 256


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] (or scalar) so it broadcasts against `like` [B, ...], on its device and in its
    dtype. Host values go over without a stream synchronisation (non_blocking): a sampling loop keeps its times on
    the CPU, and a blocking copy per coefficient would stall the GPU queue at every step."""
    v = torch.as_tensor(v)
    if v.ndim:
        v = v.reshape(-1, *([1] * (like.ndim - 1)))
    return v.to(device=like.device, dtype=like.dtype, non_blocking=True)


def snap_to_int(v: Tensor, tol: float = 1e-3) -> Tensor:
    """Table indices computed through float32 times land a few 1e-6 off integers; snap those back."""
    r = v.round()
    return torch.where((v - r).abs() < tol, r, v)


class Schedule(Protocol):
    """x_t = alpha(t) * x0 + sigma(t) * eps with t in [0, 1] and t = 0 clean."""

    kind: str  # "vp" or "flow"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def model_timestep(self, t: Tensor) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class DiscreteVP:
    """DDPM variance-preserving table: alpha = sqrt(alphabar), sigma = sqrt(1 - alphabar) (Ho et al. 2020, Eq. 4).

    Times between table entries interpolate log(alphabar) linearly, the same device k-diffusion uses to make a
    discrete schedule continuous; at integer indices the values equal diffusers' `alphas_cumprod` exactly.
    """

    alphas_cumprod: Tensor
    kind: str = "vp"
    _log_tables: dict = field(default_factory=dict, repr=False)   # log(alphabar) per device, built once
    _memo: dict = field(default_factory=dict, repr=False)         # CPU alpha_sigma results by time values

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alphabar(self, t: Tensor) -> Tensor:
        log_ab = self._log_tables.get(t.device)
        if log_ab is None:
            log_ab = self._log_tables[t.device] = self.alphas_cumprod.double().log().to(t.device)
        pos = t.double().clamp(0, 1) * (len(log_ab) - 1)
        lo = pos.floor().long().clamp(max=len(log_ab) - 2)
        return torch.lerp(log_ab[lo], log_ab[lo + 1], pos - lo).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """On CPU, results are memoised by the time values: a sampling loop asks for the same few grid times at
        every step (denoiser and step function), and the interpolation costs a dozen small ops per call. Cached
        tensors are handed out as clones, so a caller's in-place edit cannot reach the cache."""
        if t.device.type != "cpu" or t.numel() > MEMO_MAX_NUMEL or t.requires_grad:
            return self._alpha_sigma(t)
        key = (t.dtype, tuple(t.shape), tuple(t.reshape(-1).tolist()))
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= MEMO_MAX_ENTRIES:
                self._memo.clear()
            hit = self._memo[key] = self._alpha_sigma(t)
        return hit[0].clone(), hit[1].clone()

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alphabar(t)
        return ab.sqrt().float(), (1 - ab).sqrt().float()

    def model_timestep(self, t: Tensor) -> Tensor:
        """The network's timestep argument: the table index (0..N-1), as diffusers pipelines pass it."""
        return snap_to_int(t.double() * (self.num_train_timesteps - 1)).float()

    def to_t(self, index: Tensor | int | float) -> Tensor:
        """Table index (diffusers timestep) -> t in [0, 1]."""
        return torch.as_tensor(index, dtype=torch.float64) / (self.num_train_timesteps - 1)


@dataclass(frozen=True, eq=False)
class RectifiedFlow:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024 Eq. 1): alpha = 1 - t, sigma = t.

    `timestep_scale` is what the network multiplies t by: 1000 for SD3 (the pipeline passes 1000 * sigma),
    1 for FLUX (its transformer scales by 1000 itself).
    """

    timestep_scale: float = 1000.0
    kind: str = "flow"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.float()
        return 1 - t, t

    def model_timestep(self, t: Tensor) -> Tensor:
        return t.float() * self.timestep_scale


def static_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift (Esser et al. 2024, Eq. 23): t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_shift(t: Tensor, mu: float) -> Tensor:
    """FLUX's exponential time shift: t' = e^mu / (e^mu + (1/t - 1)); t = 0 stays 0."""
    t = t.double()
    out = math.exp(mu) / (math.exp(mu) + (1 / t.clamp_min(1e-12) - 1))
    return torch.where(t > 0, out, torch.zeros_like(out)).float()


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's shift parameter, linear in the number of image tokens (diffusers `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len
