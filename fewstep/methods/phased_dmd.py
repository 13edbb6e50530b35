"""Phased DMD's `method:` settings (algorithms.md §4), torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard


@dataclass
class PhasedDMDConfig:
    phase_steps: list[int] = field(default_factory=lambda: [2, 2])  # student steps per phase, high noise first
    schedule: str = "progressive"            # progressive (phase 0 for steps/K iterations, then 1, ...) | alternate
    critic_steps_per_student_step: int = 5
    real_guidance: float = 2.0
    margin: float = 0.02                     # sample t > s + margin: the subinterval target blows up as t -> s
    dm_t_min: float = 0.02                   # for the last phase (s = 0)
    dm_t_max: float = 0.98
    critic_t_min: float = 0.001
    critic_t_max: float = 1.0
    critic_mode: str = "lora"                # lora (adapter per phase on the frozen base) | full (copy per phase)
    critic_rank: int = 16
    critic_alpha: float = 16.0
    critic_lr: float = 0.0
    norm_min: float = 1e-4


def check_phases(phase_steps: list[int], steps: int) -> None:
    """Phased DMD splits the student's steps into phases (algorithms.md §4.1) of at least one step each."""
    if not phase_steps or any(n < 1 for n in phase_steps) or sum(phase_steps) != steps:
        raise FewstepError(f"method.phase_steps={list(phase_steps)} must be positive and sum to sample.steps={steps}")


def phased_dmd_rules(method: Any, run: Any) -> None:
    check_phases(list(method.phase_steps), run.sample.steps)


CARD = MethodCard(name="phased_dmd", config=PhasedDMDConfig, builder="fewstep.recipes.phased_dmd:build_phased_dmd",
                  choices={"schedule": ("progressive", "alternate"), "critic_mode": ("lora", "full")},
                  rules=phased_dmd_rules)
