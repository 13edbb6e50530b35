"""Each algorithm's `method:` settings as plain dataclasses, with the string choices they accept and the rules
that tie them to the rest of the run.

This module imports neither torch nor diffusers, so `fewstep.config` validates a whole run configuration (keys,
types, choices, ranges) before anything heavy loads. The recipe classes in `fewstep.recipes` read these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fewstep.errors import FewstepError


@dataclass
class LCMConfig:
    num_ddim_timesteps: int = 50        # N: the skipping-step teacher solver grid (k = 1000 / N on DDPM tables)
    guidance_min: float = 2.0           # teacher CFG scale range, Imagen convention (w = LCM omega + 1)
    guidance_max: float = 2.0
    guidance_embedding: bool = False    # full mode: embed w in the student (time_cond_proj_dim), no CFG at inference
    embedding_dim: int = 256            # width of the w-embedding (the UNet's time_cond_proj_dim) with guidance_embedding
    loss: str = "huber"                 # huber | l2
    huber_c: float = 0.001
    target_ema_decay: float = 0.95      # full mode: EMA target network theta^-; LoRA mode uses the online student


@dataclass
class DMD2Config:
    critic_steps_per_student_step: int = 5   # TTUR ratio N (official: 5 SDXL, 10 SD1.5)
    real_guidance: float = 2.0               # teacher CFG w_real in the DM term (Imagen convention)
    dm_t_min: float = 0.02                   # DM timesteps t ~ U[0.02, 0.98] (DMD2 min/max_step_percent)
    dm_t_max: float = 0.98
    critic_t_min: float = 0.001              # fake-score denoising timesteps
    critic_t_max: float = 1.0
    dm_weight: float = 1.0
    backward_simulation: bool = True         # inference-like student inputs made by the current student
    gan_generator_weight: float = 0.0        # 0 switches the GAN term off (official SDXL: 5e-3)
    gan_critic_weight: float = 0.0           # official: 1e-2
    gan_t_max: float = 1.0                   # diffusion-GAN noising of the classifier input, t ~ U[0, gan_t_max]
    gan_head_width: int = 256
    critic_mode: str = "lora"                # lora (adapter on the shared frozen base) | full (trainable copy)
    critic_rank: int = 16
    critic_alpha: float = 16.0
    critic_lr: float = 0.0                   # 0 = train.lr
    critic_weighting: str = "teacher"        # denoising loss space: teacher (its own prediction type, as DMD2) | x0 |
                                             # eps | v | flow; x0 weighs high noise, where global structure forms
    decoupled: bool = False                  # §7.1: CFG-augmentation and DM terms on separate draws and weights
    ca_weight: float = 1.0
    ca_t_min: float = 0.02
    ca_t_max: float = 0.98
    norm_min: float = 1e-4                   # clamp of the DMD normaliser mean|x - x0_real| (LightX2V)
    regression_weight: float = 0.0           # DMD (v1): lambda_reg on teacher noise->image pairs (paper: 0.25)
    regression_loss: str = "l2"              # l2 | huber, in latent space (LPIPS needs weights fewstep lacks)
    pairs_path: str = ""                     # folder written by `fewstep pairs`


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

METHODS: dict[str, type] = {"lcm": LCMConfig, "dmd2": DMD2Config, "phased_dmd": PhasedDMDConfig}

# String settings each algorithm accepts, checked when the config loads (before any model does).
METHOD_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "lcm": {"loss": ("huber", "l2")},
    "dmd2": {"critic_mode": ("lora", "full"), "critic_weighting": ("teacher", "x0", "eps", "v", "flow"),
             "regression_loss": ("l2", "huber")},
    "phased_dmd": {"schedule": ("progressive", "alternate"), "critic_mode": ("lora", "full")},
}


def check_phases(phase_steps: list[int], steps: int) -> None:
    """Phased DMD splits the student's steps into phases (algorithms.md §4.1) of at least one step each."""
    if not phase_steps or any(n < 1 for n in phase_steps) or sum(phase_steps) != steps:
        raise FewstepError(f"method.phase_steps={list(phase_steps)} must be positive and sum to sample.steps={steps}")


def lcm_rules(method: Any, run: Any) -> None:
    if not 1 <= method.guidance_min <= method.guidance_max:
        raise FewstepError(f"method.guidance_min/max must satisfy 1 <= min <= max (got {method.guidance_min}, "
                           f"{method.guidance_max})")
    if method.guidance_embedding and run.student.mode != "full":
        raise FewstepError("method.guidance_embedding=true needs student.mode=full (a LoRA cannot add the "
                           "embedding layer); set student.mode=full or method.guidance_embedding=false")


def dmd2_rules(method: Any, run: Any) -> None:
    """Terms that need real images refuse prompt-only data here, at load (the recipe's own guard fires only at
    the first step); DMD's regression term needs its pairs cache."""
    if run.data.source == "prompts" and not method.backward_simulation:
        raise FewstepError("method.backward_simulation=false needs real images: use data.source=digits or folder, "
                           "or method.backward_simulation=true")
    if run.data.source == "prompts" and (method.gan_critic_weight > 0 or method.gan_generator_weight > 0):
        raise FewstepError("the GAN term needs real images: use data.source=digits or folder, or set "
                           "method.gan_generator_weight=0 method.gan_critic_weight=0")
    if method.regression_weight > 0 and not method.pairs_path:
        raise FewstepError("method.regression_weight > 0 needs method.pairs_path: build teacher pairs with "
                           "`fewstep pairs <teacher> --out DIR` and pass method.pairs_path=DIR")


def phased_dmd_rules(method: Any, run: Any) -> None:
    check_phases(list(method.phase_steps), run.sample.steps)


# Cross-setting rules per algorithm, run by fewstep.config after the generic checks (method, whole run config).
METHOD_RULES: dict[str, Callable[[Any, Any], None]] = {"lcm": lcm_rules, "dmd2": dmd2_rules,
                                                       "phased_dmd": phased_dmd_rules}
