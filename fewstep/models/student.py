"""Build the trainable student from the teacher: a LoRA on the shared frozen base (one copy of the weights; the
teacher is the same network with adapters switched off) or a full trainable copy."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from fewstep.errors import FewstepError


def add_lora(net: nn.Module, rank: int, alpha: float, targets: Sequence[str], init_scale: float = 0.0,
             seed: int = 0) -> nn.Module:
    """Attach a peft LoRA adapter (Hu et al. 2021) on the frozen base; only lora_A/B train.
    `init_scale > 0` draws lora_B at random so an untrained adapter is not a no-op (used by round-trip tests)."""
    from fewstep.models import lora

    check_lora_targets(net, targets)
    net.requires_grad_(False)
    lora.add_lora(net, lora.lora_config(list(targets), rank, alpha))
    fp32_trainable(net)
    if init_scale > 0:
        gen = torch.Generator().manual_seed(seed)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=gen) * init_scale)
    return net


def check_lora_targets(net: nn.Module, targets: Sequence[str]) -> None:
    """Every LoRA target names modules of `net` the way peft matches them (the full name or its last parts)."""
    names = [name for name, _ in net.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        layers = sorted({short_name(n) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise FewstepError(f"student.lora.targets {unknown} match no module of the {type(net).__name__}; use names "
                           f"such as {layers[:12]}")


def short_name(name: str) -> str:
    """The target name peft matches for a module: its last part, with its parent's where that part is an index
    (`...attn1.to_out.0` -> `to_out.0`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def fp32_trainable(net: nn.Module) -> None:
    """Trainable parameters in float32 whatever the frozen base's dtype: peft creates adapters in the base layer's
    dtype, and Adam on fp16 weights underflows its second moment into NaN (seen on an fp16 SD1.5 teacher). peft
    runs the adapter in its own dtype and casts the result back, so the base stays fp16/bf16."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(net, dtype=torch.float32)


def lora_config_dict(net: nn.Module, name: str | None = None) -> dict:
    """The student's adapter config: `name`, else "default" (plain LoRA students), else the first phase expert."""
    configs = net.peft_config
    key = name or next((k for k in ("default", "phase0") if k in configs), next(iter(configs)))
    return configs[key].to_dict()


def has_lora(net: nn.Module) -> bool:
    return bool(getattr(net, "peft_config", None))


def full_copy(net: nn.Module) -> nn.Module:
    student = copy.deepcopy(net).float()
    student.requires_grad_(True).train()
    return student


def add_guidance_embedding(net: nn.Module, dim: int = 256) -> nn.Module:
    """LCM's guidance-scale conditioning (Luo et al. 2023, §4.2): rebuild the UNet with `time_cond_proj_dim` and a
    zero-initialised projection, so at step 0 the student still equals the teacher (the diffusers script leaves it
    random; algorithms.md §1.8)."""
    config = dict(net.config)
    config["time_cond_proj_dim"] = dim
    new = type(net).from_config(config)
    missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.to(next(net.parameters()).device)
