"""Distribution matching, the building blocks the DMD family composes (DMD2, Phased DMD, TDM, RTDMD).

Every block takes denoisers (the frozen teacher `real`, the trainable fake score `fake`), a schedule and
encoded conditions; none knows a pipeline, a model family or a recipe. Random draws come from the caller's
generator in a fixed order: times first, then noise (algorithms.md §0.6, §3.4, §7.1). The math itself (the
direction, its normaliser and guards, the denoising weights) lives in `fewstep.recipes.losses`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import Schedule
from fewstep.models.denoiser import concat_cond
from fewstep.recipes import losses as L
from fewstep.sampling.draws import Generators, randn, uniform

Cond = dict[str, Tensor]


def noise_at(schedule: Schedule, x: Tensor, lo: float, hi: float, generator: Generators) -> tuple[Tensor, Tensor]:
    """(alpha_t x + sigma_t n, t) with t ~ U[lo, hi] per sample and fresh noise n (drawn after t)."""
    t = uniform(generator, len(x), lo, hi, x.device)
    return diffuse(x, t, schedule, randn(x.shape, generator)), t


def teacher_cond_uncond(real: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, neg: Cond) -> tuple[Tensor, Tensor]:
    """The teacher's conditional and unconditional x0 at (x_t, t), in one batched forward."""
    both = real(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(cond, neg))
    x0_cond, x0_uncond = both.chunk(2)
    return x0_cond, x0_uncond


def guided_x0(real: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, neg: Cond, guidance: float) -> Tensor:
    """The teacher's CFG x0, Imagen convention x0_u + w (x0_c - x0_u) (algorithms.md §0.5); w = 1 is one
    conditional forward."""
    if guidance == 1:
        return real(x_t, t, cond)
    x0_cond, x0_uncond = teacher_cond_uncond(real, x_t, t, cond, neg)
    return x0_uncond + guidance * (x0_cond - x0_uncond)


@torch.no_grad()
def dm_direction(x: Tensor, real: nn.Module, fake: nn.Module, schedule: Schedule, cond: Cond, neg: Cond, *,
                 guidance: float, t_range: tuple[float, float], norm_min: float | None,
                 generator: Generators) -> Tensor:
    """The DMD gradient g at the generator sample x (algorithms.md §0.6; Yin et al. 2024, Eq. 7-8): re-noise x to
    t ~ U[t_range], compare the guided teacher's x0 with the fake score's, normalise by mean|x - x0_real|. The
    teacher is always called with both conditions (so its draw order and batch shape do not depend on w)."""
    x_t, t = noise_at(schedule, x, *t_range, generator)
    xc, xu = teacher_cond_uncond(real, x_t, t, cond, neg)
    return L.dmd_direction(x, xu + guidance * (xc - xu), fake(x_t, t, cond), norm_min)


@torch.no_grad()
def decoupled_direction(x: Tensor, real: nn.Module, fake: nn.Module, schedule: Schedule, cond: Cond, neg: Cond, *,
                        guidance: float, ca: tuple[float, float, float], dm: tuple[float, float, float],
                        norm_min: float | None, generator: Generators) -> Tensor:
    """Decoupled DMD (algorithms.md §7.1; Liu et al. 2025): the CFG-augmentation and distribution-matching terms
    on separate re-noising draws, each (weight, t_min, t_max); a zero weight skips its draw."""
    g = torch.zeros_like(x)
    for (weight, lo, hi), is_ca in ((ca, True), (dm, False)):
        if weight <= 0:
            continue
        x_t, t = noise_at(schedule, x, lo, hi, generator)
        xc, xu = teacher_cond_uncond(real, x_t, t, cond, neg)
        x0_fake = xc if is_ca else fake(x_t, t, cond)
        g = g + L.decoupled_dmd_direction(x, xc, xu, x0_fake, guidance, w_cfg=weight if is_ca else 0.0,
                                          w_dm=0.0 if is_ca else weight, eps_norm_min=norm_min)
    return g


def fake_score_loss(fake: nn.Module, x: Tensor, cond: Cond, schedule: Schedule, *, t_range: tuple[float, float],
                    space: str, generator: Generators) -> Tensor:
    """The fake score's denoising loss on sg(x) (DMD2 §3.4; algorithms.md §2.3): re-noise to t ~ U[t_range] and
    regress x0 in the weighting of `space` ("x0", "eps", "v", "flow"; eps-MSE is DMD2-SD's loss)."""
    x = x.detach()
    x_t, t = noise_at(schedule, x, *t_range, generator)
    return L.critic_denoising_loss(fake(x_t, t, cond), x, L.denoising_weight(t, schedule, space))


def as_range(cfg: Any, prefix: str) -> tuple[float, float]:
    """(cfg.<prefix>_t_min, cfg.<prefix>_t_max)."""
    return float(getattr(cfg, f"{prefix}_t_min")), float(getattr(cfg, f"{prefix}_t_max"))
