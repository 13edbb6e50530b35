"""Building the recipe a run names. Each recipe module holds its class and its builder; its torch-free card in
`fewstep.methods` names the builder, so this module lists no recipe."""
from __future__ import annotations

from omegaconf import DictConfig

from fewstep.methods import builder
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import Recipe


def build_recipe(cfg: DictConfig, teacher: Teacher) -> Recipe:
    """The recipe of `cfg.algorithm` (already validated against fewstep.methods.CARDS when the config loaded)."""
    return builder(cfg.algorithm)(cfg, teacher)
