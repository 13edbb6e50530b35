"""One training iteration of any recipe, apart from the run around it (data, accelerate, checkpoints, logging):
one AdamW and LR schedule per trainable role, the summed losses back-propagated once, each role that produced a
loss clipped and stepped, then the recipe's after-step hook. The trainer calls exactly this; the analytic-teacher
tests call it with closed-form teachers and no pipeline."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.recipes.base import Batch, Recipe

Reduce = Callable[[Tensor], Tensor]


class RoleOptimizers:
    """AdamW + LR schedule per role of `recipe`, from the run's `train` settings (lr, betas, weight_decay,
    lr_schedule, warmup_steps, steps, grad_clip) and the recipe's per-role overrides. `reduce` averages a
    gradient across processes (multi-process runs); None leaves gradients alone."""

    def __init__(self, recipe: Recipe, train: Any, reduce: Reduce | None = None) -> None:
        from diffusers.optimization import get_scheduler

        self.grad_clip, self.reduce = float(train.grad_clip or 0), reduce
        self.params: dict[str, dict[str, nn.Parameter]] = {r: recipe.parameters(r) for r in recipe.trainable()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        for role, named in self.params.items():     # captured once: roles may share a net
            if not named:
                raise FewstepError(f"role {role!r} has no trainable parameters; check student.mode / LoRA targets")
            settings = {"lr": train.lr, "betas": tuple(train.betas), "weight_decay": train.weight_decay,
                        **recipe.optimizer_settings(role)}
            self.optimizers[role] = torch.optim.AdamW(list(named.values()), **settings)
            self.schedulers[role] = get_scheduler(train.lr_schedule, self.optimizers[role],
                                                  num_warmup_steps=train.warmup_steps, num_training_steps=train.steps)

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step(self, role: str) -> float:
        """Average (multi-process), clip, step when the norm is finite, advance the schedule; the grad norm."""
        params = list(self.params[role].values())
        if self.reduce is not None:
            for p in params:
                if p.grad is not None:
                    p.grad = self.reduce(p.grad)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if torch.isfinite(norm):
            self.optimizers[role].step()
        self.schedulers[role].step()
        return float(norm)


def train_iteration(recipe: Recipe, optim: RoleOptimizers, batch: Callable[[int], Batch], step: int,
                    generator: torch.Generator, accumulation: int = 1,
                    autocast: Callable[[], ContextManager] = nullcontext) -> tuple[dict[str, float], set[str]]:
    """(mean losses and metrics over the micro-batches, plus grad_norm/<role>; the roles that stepped).
    `batch(i)` is micro-batch i of this iteration."""
    optim.zero_grad()
    totals: dict[str, float] = {}
    stepped: set[str] = set()
    for micro in range(accumulation):
        with autocast():
            out = recipe.train_step(batch(micro), step, generator)
        loss = sum(out.losses.values()) / accumulation
        loss.backward()
        stepped.update(out.losses)
        for k, v in {**{f"loss/{r}": float(l.detach()) for r, l in out.losses.items()}, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accumulation
    for role in stepped:
        totals[f"grad_norm/{role}"] = optim.step(role)
    recipe.after_optimizer_step(step)
    return totals, stepped
