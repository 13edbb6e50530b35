"""The one trajectory loop: a denoiser integrated over a time grid with a step function, for sampling (no
gradients) and for training rollouts (gradients through the steps you select). `engine.sample` is this loop with
no gradients; DMD2's backward simulation is this loop stopped at a drawn step with the gradient on its last call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule
from fewstep.sampling.steps import Generators, Step, ddim_step


@dataclass
class Trajectory:
    """Where a rollout ended: `x` is the sample after the last step (the input of the last denoiser call when
    the rollout stopped at `until`), `x0` the last denoiser output, `index` the index of the last call."""

    x: Tensor
    x0: Tensor
    index: int


def grad_calls(grad: str | Collection[int], last: int) -> set[int]:
    """The denoiser calls that carry gradients: "last", "none", "all", or explicit call indices."""
    if grad == "last":
        return {last}
    if grad == "none":
        return set()
    if grad == "all":
        return set(range(last + 1))
    return {int(i) for i in grad}


def rollout(denoiser: nn.Module | Callable[..., Tensor], noise: Tensor, times: Tensor, schedule: Schedule, *,
            cond: Any = None, step: Step = ddim_step, generator: Generators = None, until: int | None = None,
            grad: str | Collection[int] = "last", callback: Callable[..., None] | None = None,
            progress: bool = False, **step_kwargs: Any) -> Trajectory:
    """Integrate from times[0] towards times[-1] = 0: call i asks the denoiser for x0 at times[i], then `step`
    moves to times[i + 1] (drawing its noise from `generator` in the engine's order). With `until = k` the loop
    stops after call k without stepping (a training rollout: the student's output at its k-th input). Gradients
    are on only inside the calls in `grad` (and the step that follows each of them); elsewhere the loop runs
    under no_grad, so no gradient reaches earlier calls through a later unselected one. Times stay on the host."""
    from tqdm.auto import tqdm

    times = times.detach().cpu()
    calls = len(times) - 1 if until is None else until + 1
    if not 0 < calls <= len(times):
        raise ValueError(f"until={until} is outside the {len(times)}-time grid")
    with_grad = grad_calls(grad, calls - 1)
    x, x0 = noise, noise
    for i in tqdm(range(calls), disable=not progress, desc="sampling", leave=False):
        tb = times[i].expand(len(x))
        with torch.set_grad_enabled(i in with_grad and torch.is_grad_enabled()):
            x0 = denoiser(x, tb, cond)
            if callback is not None:
                callback(i=i, t=times[i], x=x, x0=x0)
            if i == until:
                return Trajectory(x, x0, i)
            x = step(x, x0, tb, times[i + 1].expand(len(x)), schedule, generator, **step_kwargs)
    return Trajectory(x, x0, calls - 1)
