"""The forward process, the one place it is written: noising clean data to time t, and the exact transition of
an already noisy sample from time s to a later time t. Pure functions; the caller draws the noise (so every
caller keeps its own random-draw order) and passes it in."""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.diffusion.schedule import Schedule, bcast


def diffuse(x0: Tensor, t: Tensor, schedule: Schedule, noise: Tensor) -> Tensor:
    """x_t ~ q(x_t | x0) = N(alpha_t x0, sigma_t^2 I) (Ho et al. 2020, Eq. 4; on rectified flow alpha = 1 - t,
    sigma = t): alpha_t x0 + sigma_t noise, with `t` one time per sample."""
    a, s = (bcast(v, x0) for v in schedule.alpha_sigma(t))
    return a * x0 + s * noise.to(x0.device)


def transition_coeffs(s: Tensor | float, t: Tensor | float, schedule: Schedule, like: Tensor) -> tuple[Tensor, Tensor]:
    """q(x_t | x_s) = N(a x_s, b^2 I) for s < t on any Gaussian path (algorithms.md §0.2, §4.2):
    a = alpha_t / alpha_s, b = sqrt(sigma_t^2 - a^2 sigma_s^2); on rectified flow a = (1 - t) / (1 - s). float64,
    broadcast to `like`; b^2 and alpha_s are clamped at 1e-12 (§8.3)."""
    st = [torch.as_tensor(v, dtype=torch.float64, device=like.device) for v in (s, t)]
    (a_s, s_s), (a_t, s_t) = ((bcast(v.double(), like.double()) for v in schedule.alpha_sigma(u)) for u in st)
    a = a_t / a_s.clamp_min(1e-12)
    return a, (s_t**2 - a**2 * s_s**2).clamp_min(1e-12).sqrt()


def transition(x_s: Tensor, s: Tensor | float, t: Tensor | float, schedule: Schedule, noise: Tensor) -> Tensor:
    """x_t ~ q(x_t | x_s): a x_s + b noise, computed in float64 and returned in x_s's dtype. If x_s = alpha_s x0 +
    sigma_s eps, the result is distributed as alpha_t x0 + sigma_t eps' with eps' ~ N(0, I)."""
    a, b = transition_coeffs(s, t, schedule, x_s)
    return (a * x_s.double() + b * noise.to(x_s.device).double()).to(x_s.dtype)
