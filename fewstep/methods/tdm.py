"""TDM's `method:` settings (Luo et al. 2025, Trajectory Distribution Matching; algorithms.md §5), torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard


@dataclass
class TDMConfig:
    total_steps: int = 900              # K_T: the student's trajectory spans table entries K_T - 1 .. 0 (README 900)
    real_guidance: float = 4.5          # teacher CFG in the generator target (README 4.5, Imagen convention)
    interval: str = "separate"          # separate (--use_separate: t inside the step's own interval) | global
    random_mid: bool = False            # --use_randmid: the interval's lower end drawn in [t_mid, t_g - 20)
    low_margin: int = 20                # noise levels start 20 entries above the interval's lower end
    high_margin: int = 10               # ... and end 10 entries below the state's own time
    snr_clip: float = 5.0               # fake-score weight min(SNR_t, 5) x importance weight
    importance_weight: bool = True      # the mixed-noise correction exp(-mean m^2/2) / exp(-mean z^2/2)
    loss: str = "huber"                 # generator distance: huber (--use_huber, c = 1e-3; sign-DMD) | l2
    huber_c: float = 0.001
    norm_min: float = 1e-4              # clamp of the DMD normaliser mean|x0hat - x0_cfg|
    student_lr_scale: float = 0.2       # the student trains at train.lr / 5, the fake score at train.lr
    sampler: str = "ddim"               # inference: ddim (the training-consistent sampler) | dpmsolver (DPM-Solver++
                                        # 2M on the same times, the README's DPMSolverMultistepScheduler; DDPM tables)
    critic_mode: str = "lora"           # lora (adapter on the shared frozen base) | full (trainable copy)
    critic_rank: int = 16
    critic_alpha: float = 16.0


def step_width(total_steps: int, steps: int) -> int:
    """Delta = K_T // M, the table entries one student step covers (algorithms.md §5.3)."""
    return total_steps // steps


def tdm_rules(method: Any, run: Any) -> None:
    """The trajectory lives on the table entries below K_T: explicit student times would contradict it, and each
    step's interval must leave room for the margins (Delta > low + high margin + 1)."""
    if list(run.sample.timesteps):
        raise FewstepError("recipe=tdm derives the student's times from method.total_steps; drop sample.timesteps "
                           "and set method.total_steps instead")
    width = step_width(method.total_steps, run.sample.steps)
    if method.total_steps < 1 or width <= method.low_margin + method.high_margin + 1:
        raise FewstepError(f"method.total_steps={method.total_steps} over sample.steps={run.sample.steps} gives "
                           f"{width} table entries per step, too few for the margins ({method.low_margin} + "
                           f"{method.high_margin}); raise method.total_steps or lower the margins")
    if not 0 < method.student_lr_scale <= 1:
        raise FewstepError(f"method.student_lr_scale must lie in (0, 1] (got {method.student_lr_scale})")
    if method.real_guidance < 1:
        raise FewstepError(f"method.real_guidance must be >= 1 (got {method.real_guidance})")


CARD = MethodCard(name="tdm", config=TDMConfig, builder="fewstep.recipes.tdm:build_tdm",
                  choices={"interval": ("separate", "global"), "loss": ("huber", "l2"), "sampler": ("ddim", "dpmsolver"),
                           "critic_mode": ("lora", "full")},
                  rules=tdm_rules)
