"""Loss functions shared by recipes: small, pure, cited."""
from __future__ import annotations

import torch
from torch import Tensor


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Pseudo-Huber loss sqrt((a - b)^2 + c^2) - c (Song & Dhariwal 2023, §3.3; LCM scripts), mean over elements."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()


def l2(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred.float() - target.float()) ** 2).mean()


def consistency_loss(pred: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """The consistency-distillation distance d(f_theta, f_target) (Luo et al. 2023, Eq. 8)."""
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    if kind == "l2":
        return l2(pred, target)
    raise ValueError(f"unknown loss {kind!r}; use huber or l2")


@torch.no_grad()
def ema_update(target: list[Tensor], online: list[Tensor], decay: float) -> None:
    """theta_target <- decay * theta_target + (1 - decay) * theta_online (LCM's target network, Alg. 1)."""
    torch._foreach_lerp_(target, online, 1 - decay)
