"""The DMD family's critic: a trainable copy of the teacher that learns the student's score (the "fake score"),
by default a LoRA adapter on the frozen teacher base (one copy of the weights), plus an optional GAN classifier
head that reads the critic's bottleneck features through a forward hook (DMD2, Yin et al. 2024, §4.3)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.models.adapters import CRITIC, WithAdapter, add_named_adapter, live_adapter
from fewstep.models.student import full_copy
from fewstep.models.teacher import Teacher


def build_critic(teacher: Teacher, mode: str, rank: int, alpha: float, targets: list[str],
                 base: nn.Module | None = None, name: str = CRITIC) -> tuple[nn.Module, nn.Module, dict[str, nn.Parameter]]:
    """(critic denoiser, its network, its trainable parameters). mode "lora": adapter on the shared base;
    "full": a trainable copy of `base` (pass the clean teacher network before any student adapter is added)."""
    if mode == "full":
        net = full_copy(base if base is not None else teacher.net)
        return teacher.denoiser(net), net, {f"net.{n}": p for n, p in net.named_parameters()}
    params = add_named_adapter(teacher.net, name, rank, alpha, targets)
    return WithAdapter(teacher.denoiser(teacher.net), name), teacher.net, params


def feature_module(net: nn.Module) -> nn.Module:
    """Where the GAN head reads: the UNet bottleneck (DMD2 `classify_forward` rep[-1]), else the middle block of a
    transformer's block list."""
    mid = getattr(net, "mid_block", None)
    if mid is not None:
        return mid
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"no mid_block or transformer_blocks on {type(net).__name__} for the GAN head")
    return blocks[len(blocks) // 2]


class FeatureTap:
    """Forward hook keeping the last output of a module (the last tensor when it returns a tuple)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self._store)

    def _store(self, module: nn.Module, args: object, out: object) -> None:
        if isinstance(out, (tuple, list)):
            out = [o for o in out if torch.is_tensor(o)][-1]
        self.value = out


class GanHead(nn.Module):
    """Classifier on critic features -> one logit per sample. Spatial features [B, C, H, W]: conv blocks with
    stride 2 down to <= 4x4, then global pooling (DMD2's head, §3.1, made size-agnostic); token features
    [B, N, D]: a token MLP and mean pooling."""

    def __init__(self, channels: int, spatial: bool, size: int = 8, width: int = 256) -> None:
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)
        if spatial:
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
            while size > 4:
                layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
                size //= 2
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        else:
            layers = [nn.LayerNorm(channels), nn.Linear(channels, width), nn.SiLU()]
        self.body, self.spatial = nn.Sequential(*layers), spatial
        self.out = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        h = self.body(features.float())
        if not self.spatial:
            h = h.mean(dim=1)
        return self.out(h).squeeze(-1)


def make_head(tap: FeatureTap, width: int, device: torch.device) -> GanHead:
    """Size the head from one feature map the critic already produced."""
    f = tap.value
    assert f is not None, "run the critic once before building the head"
    head = GanHead(f.shape[1] if f.ndim == 4 else f.shape[-1], f.ndim == 4, f.shape[-1] if f.ndim == 4 else 0, width)
    return head.to(device)


__all__ = ["build_critic", "FeatureTap", "GanHead", "make_head", "feature_module", "live_adapter"]
