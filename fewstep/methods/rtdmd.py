"""RTDMD stage 2, the hybrid policy gradient (`recipe=rtdmd`; algorithms.md §6.4): the `method:` settings,
torch-free. `teacher.pretrained` is the stage-1 export (a full pipeline: its network is the student's base, and
stage-2 LoRA exports load onto it); `method.real_teacher_path` is the original teacher for the AC-DMD auxiliary
term."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard
from fewstep.methods.reward import RewardTermConfig, check_reward_terms


@dataclass
class RTDMDConfig:
    real_teacher_path: str = ""               # the original teacher (preset name, folder or hub id)
    eta: float = 0.9                          # CPS noise level of the rollout and of the export
    group_size: int = 4                       # K images per prompt (official 24; data.batch_size a multiple of K)
    train_steps: int = 2                      # SubGRPO: stochastic steps trained per iteration, drawn from ...
    step_first: int = 0                       # ... step_first..step_last (official 0..2 of a 4-step rollout)
    step_last: int = 2
    clip_range: float = 1e-5                  # PPO clip of the ratio (tuned to the unnormalised CPS log-prob)
    adv_clip: float = 5.0
    reward: list[RewardTermConfig] = field(default_factory=list)   # advantage rewards (and BP's, when on)
    bp_weight: float = 1e-4                   # reward backprop on the deterministic last step (0 = off)
    bp_margin: Optional[float] = 3.0          # its hinge relu(margin - R)
    aux_weight: float = 1e-3                  # AC-DMD auxiliary term on the last step (s = 0)
    kl_weight: float = 0.0                    # KL to the stage-1 policy on the trained steps (official: 0, none)
    real_guidance: float = 4.5                # teacher CFG in the auxiliary term
    renoise_t_min: float = 0.02
    renoise_t_max: float = 0.98
    consistency_weight: float = 0.01          # the fake score's ambient-consistency regulariser
    consistency_max_dt: float = 0.2
    critic_weight_cap: float = 10.0
    norm_min: float = 1e-4
    critic_mode: str = "lora"
    critic_rank: int = 16
    critic_alpha: float = 16.0


def rtdmd_rules(method: Any, run: Any) -> None:
    if not method.real_teacher_path:
        raise FewstepError("recipe=rtdmd needs method.real_teacher_path: the original teacher (teacher.pretrained is "
                           "the stage-1 export, e.g. runs/rtdmd_cold-toy-digits-sd3/export)")
    if not method.reward:
        raise FewstepError("recipe=rtdmd needs at least one reward: method.reward=[{name: digits-class}]")
    check_reward_terms(method.reward, method.bp_weight, method.bp_margin, "bp_weight", "bp_margin")
    if method.group_size < 2 or run.data.batch_size % method.group_size:
        raise FewstepError(f"data.batch_size={run.data.batch_size} must be a multiple of method.group_size="
                           f"{method.group_size} (>= 2): each process rolls out whole prompt groups")
    last = run.sample.steps - 2
    if not 0 <= method.step_first <= method.step_last <= last:
        raise FewstepError(f"method.step_first..step_last must lie in 0..{last}, the stochastic steps of a "
                           f"{run.sample.steps}-step rollout (the last step is deterministic)")
    if not 0 < method.train_steps <= method.step_last - method.step_first + 1:
        raise FewstepError("method.train_steps must be between 1 and the number of steps in step_first..step_last")
    if method.kl_weight < 0:
        raise FewstepError(f"method.kl_weight must be >= 0 (got {method.kl_weight}): it weighs a KL penalty")
    if not 0 < method.eta <= 1:
        raise FewstepError(f"method.eta must lie in (0, 1] (got {method.eta}): stage 2 needs stochastic steps")


CARD = MethodCard(name="rtdmd", config=RTDMDConfig, builder="fewstep.recipes.rtdmd:build_rtdmd",
                  choices={"critic_mode": ("lora", "full")}, rules=rtdmd_rules)
