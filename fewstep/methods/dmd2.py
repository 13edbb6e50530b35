"""DMD2's `method:` settings (algorithms.md §3, §7.1; DMD v1's regression term), torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard
from fewstep.methods.reward import RewardBackpropConfig, check_reward_backprop


@dataclass
class DMD2Config(RewardBackpropConfig):
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


def dmd2_rules(method: Any, run: Any) -> None:
    """Terms that need real images refuse prompt-only data here, at load (the recipe's own guard fires only at
    the first step); DMD's regression term needs its pairs cache."""
    if run.data.source == "prompts" and not method.backward_simulation:
        raise FewstepError("method.backward_simulation=false needs real images: use data.source=digits or folder, "
                           "or method.backward_simulation=true")
    if run.data.source == "prompts" and (method.gan_critic_weight > 0 or method.gan_generator_weight > 0):
        raise FewstepError("the GAN term needs real images: use data.source=digits or folder, or set "
                           "method.gan_generator_weight=0 method.gan_critic_weight=0")
    check_reward_backprop(method)
    if method.regression_weight > 0 and not method.pairs_path:
        raise FewstepError("method.regression_weight > 0 needs method.pairs_path: build teacher pairs with "
                           "`fewstep pairs <teacher> --out DIR` and pass method.pairs_path=DIR")


CARD = MethodCard(name="dmd2", config=DMD2Config, builder="fewstep.recipes.dmd2:build_dmd2",
                  choices={"critic_mode": ("lora", "full"), "critic_weighting": ("teacher", "x0", "eps", "v", "flow"),
                           "regression_loss": ("l2", "huber")},
                  rules=dmd2_rules)
