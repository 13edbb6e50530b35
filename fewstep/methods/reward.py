"""Reward terms inside training (`method.reward`, `method.reward_weight`, `method.reward_margin`), torch-free: what
a run may ask for, checked when its config loads. The models behind the names are fewstep.metrics.rewards'."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from fewstep.errors import FewstepError

# fewstep.metrics.rewards.REWARDS' keys (tests/test_reward_training.py keeps the two equal), plus CLIP score
REWARD_NAMES = ("hpsv2.1", "pickscore", "aesthetic", "digits-class", "micro-clip", "clip-score")


@dataclass
class RewardTermConfig:
    """One weighted reward: a registry name (`REWARD_NAMES`) or a user class as "package.module:Class" (built with
    `options` as keyword arguments, called as reward(images [N, 3, H, W] in [0, 1], prompts) -> [N])."""

    name: str = ""
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)   # constructor arguments: weight-file paths, scale, ...


@dataclass
class RewardBackpropConfig:
    """Reward backprop on the student's decoded x0, shared by the recipes that take it (dmd2 and its kin,
    rtdmd_cold): the rewards, the term's weight in the student loss (0 = off), and the loss's form."""

    reward: list[RewardTermConfig] = field(default_factory=list)
    reward_weight: float = 0.0
    reward_margin: Optional[float] = None    # null: minimise -mean(r); a number: RTDMD's hinge relu(margin - r)


def check_reward_backprop(method: Any) -> None:
    """`check_reward_terms` on a RewardBackpropConfig's three settings."""
    check_reward_terms(method.reward, method.reward_weight, method.reward_margin)


def is_import_path(name: str) -> bool:
    return ":" in name


def check_reward_terms(terms: list[Any], weight: float, margin: float | None, weight_key: str = "reward_weight",
                       margin_key: str = "reward_margin") -> None:
    """One clear line for a term that cannot be built: an unknown name, a module that is not importable, a weight
    that is not a finite number, or a reward weight without any term (`weight_key`, `margin_key`: the settings'
    names under method.)."""
    if not math.isfinite(weight) or weight < 0:
        raise FewstepError(f"method.{weight_key} must be a finite number >= 0 (got {weight})")
    if margin is not None and not math.isfinite(margin):
        raise FewstepError(f"method.{margin_key} must be a finite number or null (got {margin})")
    if weight > 0 and not terms:
        raise FewstepError(f"method.{weight_key} > 0 needs at least one reward: method.reward=[{{name: digits-class}}] "
                           f"(names: {', '.join(REWARD_NAMES)}, or package.module:Class)")
    for i, term in enumerate(terms):
        where = f"method.reward[{i}]"
        if not math.isfinite(term.weight):
            raise FewstepError(f"{where}.weight must be a finite number (got {term.weight})")
        if is_import_path(term.name):
            module, _, cls = term.name.partition(":")
            try:
                found = bool(module) and bool(cls) and importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise FewstepError(f"{where}.name={term.name!r}: module {module!r} is not importable; give "
                                   "package.module:Class of an installed module")
        elif term.name not in REWARD_NAMES:
            raise FewstepError(f"{where}.name={term.name!r} is not a reward; choose one of "
                               f"{', '.join(REWARD_NAMES)} or give package.module:Class")
