"""The one sampling loop. A sampler is (denoiser, time grid, step function); guidance is a denoiser wrapper."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import Generators, Step, ddim_step, randn


@torch.no_grad()
def sample(denoiser: nn.Module | Callable[..., Tensor], noise: Tensor, times: Tensor, schedule: Schedule, *,
           cond: Any = None,
           step: Step = ddim_step, generator: Generators = None, callback: Callable[..., None] | None = None,
           progress: bool = False, **step_kwargs: Any) -> Tensor:
    """Integrate from times[0] to times[-1] (= 0), e.g. times = tensor([1.0, 0.75, 0.5, 0.25, 0.0]).

    Each iteration asks the denoiser for x0 at the current time and lets `step` move to the next time (the steps
    in `fewstep.sampling.steps`); this is `fewstep.sampling.rollout.rollout` without gradients. The times handed
    to both are CPU tensors whatever the device of `noise`: the schedule's coefficients are computed (and
    memoised) on the host and copied over without synchronising. `generator` feeds stochastic steps;
    `callback(i=, t=, x=, x0=)` observes.
    """
    return rollout(denoiser, noise, times, schedule, cond=cond, step=step, generator=generator, grad="none",
                   callback=callback, progress=progress, **step_kwargs).x


def initial_noise(shape: tuple[int, ...], generator: Generators, device: torch.device | str = "cpu") -> Tensor:
    """Starting latents, one generator per sample when a list is given (per-image seeds)."""
    return randn(shape, generator, device)


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
