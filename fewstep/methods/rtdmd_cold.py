"""RTDMD stage 1, AC-DMD (`recipe=rtdmd_cold`; algorithms.md §6.3): the `method:` settings, torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard
from fewstep.methods.reward import RewardBackpropConfig, check_reward_backprop


@dataclass
class ACDMDConfig(RewardBackpropConfig):
    eta: float = 0.9                          # CPS noise level, theta = eta pi / 2 (training and inference)
    critic_steps_per_student_step: int = 10   # fake:generator update ratio 10:1
    real_guidance: float = 4.5                # teacher CFG in the generator target (SD3.5-M 4.5, SD3-M 7)
    random_stop: bool = True                  # the rollout runs J ~ U{1..M} steps; false: always all M
    renoise_offset: float = 0.01              # tau ~ U[s + 0.01, 1] (10 of 1000 steps above the anchor)
    renoise_t_min: float = 0.02               # ... clamped to [0.02, 0.98]
    renoise_t_max: float = 0.98
    critic_weight_cap: float = 10.0           # move_scale_out: the fake's loss weighted min(1, cap * b^2)
    consistency_weight: float = 0.01          # gamma_cons of the ambient-consistency regulariser (0 = off)
    consistency_max_dt: float = 0.2           # tau' = max(tau - U[0.001, 0.2], 0)
    norm_min: float = 1e-4                    # clamp of the normaliser mean|x_s - xs_T|
    critic_mode: str = "lora"                 # lora (adapter on the shared frozen base) | full (trainable copy)
    critic_rank: int = 16
    critic_alpha: float = 16.0


def ac_dmd_rules(method: Any, run: Any) -> None:
    if not 0 <= method.eta <= 1:
        raise FewstepError(f"method.eta must lie in [0, 1] (got {method.eta}); CPS uses theta = eta * pi / 2")
    if method.consistency_weight > 0 and method.eta == 0:
        raise FewstepError("method.consistency_weight > 0 needs method.eta > 0: with eta = 0 the regulariser's two "
                           "CPS samples coincide and it is identically 0")
    if not 0 <= method.renoise_t_min < method.renoise_t_max <= 1:
        raise FewstepError("method.renoise_t_min and renoise_t_max must satisfy 0 <= min < max <= 1 (got "
                           f"{method.renoise_t_min}, {method.renoise_t_max})")
    if method.critic_steps_per_student_step < 1:
        raise FewstepError("method.critic_steps_per_student_step must be >= 1")
    if method.real_guidance < 1:
        raise FewstepError(f"method.real_guidance must be >= 1 (got {method.real_guidance})")
    check_reward_backprop(method)


CARD = MethodCard(name="rtdmd_cold", config=ACDMDConfig, builder="fewstep.recipes.ac_dmd:build_ac_dmd",
                  choices={"critic_mode": ("lora", "full")}, rules=ac_dmd_rules)
