"""LCM's `method:` settings (algorithms.md §1), torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewstep.errors import FewstepError
from fewstep.methods.card import MethodCard


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


def lcm_rules(method: Any, run: Any) -> None:
    if not 1 <= method.guidance_min <= method.guidance_max:
        raise FewstepError(f"method.guidance_min/max must satisfy 1 <= min <= max (got {method.guidance_min}, "
                           f"{method.guidance_max})")
    if method.guidance_embedding and run.student.mode != "full":
        raise FewstepError("method.guidance_embedding=true needs student.mode=full (a LoRA cannot add the "
                           "embedding layer); set student.mode=full or method.guidance_embedding=false")


CARD = MethodCard(name="lcm", config=LCMConfig, builder="fewstep.recipes.lcm:build_lcm",
                  choices={"loss": ("huber", "l2")},
                  rules=lcm_rules)
