"""Rewards as a training term (issue 14 item 1): frozen reward models scoring the VAE decode of a student's x0 with
gradients, weighted and summed, trained on by reward backprop. The models live here, not in a recipe's roles, so
they are never trained, never prepared by the engine and never written to checkpoints."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.methods.reward import RewardTermConfig, is_import_path
from fewstep.metrics.rewards import RewardFn, build_reward

if TYPE_CHECKING:
    from fewstep.models.teacher import Teacher


def reward_objective(r: Tensor, margin: float | None) -> Tensor:
    """What the student minimises for per-sample rewards r: -mean(r), reward backprop (ReFL / DRaFT: Xu et al. 2023,
    Clark et al. 2024); with a margin, RTDMD's hinge mean(relu(margin - r)) (algorithms.md §6.4, L_BP), which
    stops pushing a sample once its reward passes the margin."""
    return -r.mean() if margin is None else torch.relu(margin - r).mean()


def build_reward_model(term: RewardTermConfig) -> nn.Module:
    """The term's reward model, frozen and in eval mode: a registry name or a user "package.module:Class"."""
    options = dict(term.options)
    if is_import_path(term.name):
        module, _, cls = term.name.partition(":")
        try:
            model = getattr(importlib.import_module(module), cls)(**options)
        except AttributeError:
            raise FewstepError(f"reward {term.name!r}: module {module!r} has no {cls!r}") from None
    else:
        model = build_reward(term.name, **options)
    if not isinstance(model, nn.Module) or not callable(model):
        raise FewstepError(f"reward {term.name!r} must be a torch.nn.Module called as reward(images, prompts)")
    if not getattr(model, "differentiable", True):
        raise FewstepError(f"reward {term.name!r} is not differentiable; reward backprop needs a reward whose "
                           "preprocessing and model pass gradients to the images")
    return model.eval().requires_grad_(False)


class RewardLoss:
    """sum_i w_i r_i(decode(x0), prompts) and the objective on it, for a recipe's student loss."""

    def __init__(self, terms: Sequence[tuple[float, RewardFn]], decode: Callable[[Tensor], Tensor], weight: float,
                 margin: float | None = None) -> None:
        self.terms, self.decode, self.weight, self.margin = list(terms), decode, weight, margin

    def scores(self, x0: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, float]]:
        """Weighted per-sample reward (N,) of the decoded x0 (graph kept back to x0), and each term's batch mean."""
        images = self.decode(x0)
        total, parts = torch.zeros(len(x0), device=x0.device), {}
        for w, reward in self.terms:
            r = reward(images, list(prompts)).to(x0.device).float()
            parts[f"reward/{getattr(reward, 'name', type(reward).__name__)}"] = float(r.detach().mean())
            total = total + w * r
        return total, parts

    def loss(self, x0: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, float]]:
        """weight * reward_objective, and the metrics: the weighted reward's mean and each term's."""
        r, parts = self.scores(x0, prompts)
        return self.weight * reward_objective(r, self.margin), {"reward": float(r.detach().mean()), **parts}


def build_reward_loss(terms: Sequence[RewardTermConfig], weight: float, margin: float | None,
                      teacher: Teacher) -> RewardLoss | None:
    """None when the run trains on no reward (weight 0), else the models built, frozen and on the teacher's device,
    scoring the teacher's VAE decode of x0 with gradients."""
    if weight <= 0:
        return None
    device = next(teacher.net.parameters()).device
    return RewardLoss([(t.weight, build_reward_model(t).to(device)) for t in terms],
                      lambda x0: teacher.decode(x0, grad=True), weight, margin)
