"""The recipe registry: algorithm name -> builder (a function of the validated run config and the teacher that
returns the recipe). Each recipe module holds its class and its builder; adding one adds one line here."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from fewstep.models.teacher import Teacher
from fewstep.recipes.base import Recipe
from fewstep.recipes.dmd2 import build_dmd2
from fewstep.recipes.lcm import build_lcm
from fewstep.recipes.phased_dmd import build_phased_dmd

RECIPES: dict[str, Callable[[DictConfig, Teacher], Recipe]] = {"lcm": build_lcm, "dmd2": build_dmd2,
                                                              "phased_dmd": build_phased_dmd}


def build_recipe(cfg: DictConfig, teacher: Teacher) -> Recipe:
    """The recipe of `cfg.algorithm` (already validated against fewstep.methods.METHODS when the config loaded)."""
    return RECIPES[cfg.algorithm](cfg, teacher)
