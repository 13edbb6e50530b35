"""Text-to-image generation through the engine: prompts + per-image seeds -> images in [0, 1]."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewstep.models.denoiser import Guided, paired_cond
from fewstep.models.teacher import Teacher
from fewstep.sampling.engine import sample, seed_generators
from fewstep.sampling.steps import make_step, randn


def embeds_guidance(net: nn.Module) -> bool:
    """True when the network takes the CFG scale as an input (LCM w-embedding, FLUX guidance) instead of CFG."""
    cfg = getattr(net, "config", None)
    return bool(getattr(cfg, "time_cond_proj_dim", None)) or bool(getattr(cfg, "guidance_embeds", False))


def guided(teacher: Teacher, denoiser: nn.Module, net: nn.Module, scale: float) -> tuple[nn.Module, bool]:
    """(denoiser to call, whether cond is {"pos", "neg"}): CFG wrapper unless the net embeds the scale."""
    if embeds_guidance(net) or scale == 1.0:
        return denoiser, False
    return Guided(denoiser, scale), True


@torch.no_grad()
def generate_latents(teacher: Teacher, denoiser: nn.Module, net: nn.Module, prompts: list[str], seeds: list[int],
                     times: Tensor, step: str, guidance: float, size: int | None = None,
                     noise: Tensor | None = None, **step_kwargs: Any) -> Tensor:
    """One batch: per-image seeds drive the initial noise and every stochastic step."""
    gens = seed_generators(seeds)
    device = next(net.parameters()).device
    noise_fn = getattr(teacher.family, "draw_noise", randn)
    if noise is None:
        noise = noise_fn((len(prompts), *teacher.latent_shape(size)), gens, device, torch.float32)
    call, paired = guided(teacher, denoiser, net, guidance)
    cond = teacher.encode_prompts(prompts)
    if embeds_guidance(net):
        cond["guidance"] = torch.full((len(prompts),), float(guidance), device=device)
    if paired:
        cond = paired_cond(cond, teacher.null_cond(len(prompts)))
    return sample(call, noise, times, teacher.schedule, cond=cond, step=make_step(step), generator=gens,
                  noise_fn=noise_fn, **step_kwargs)


def generate_images(teacher: Teacher, denoiser: nn.Module, net: nn.Module, prompts: list[str], seeds: list[int],
                    times: Tensor, step: str, guidance: float, size: int | None = None, batch_size: int = 64,
                    progress: bool = False) -> Tensor:
    """All prompts in batches; returns decoded images [N, 3, H, W] in [0, 1] on the CPU."""
    out = []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, disable=not progress, desc="generating"):
        lat = generate_latents(teacher, denoiser, net, prompts[i:i + batch_size], seeds[i:i + batch_size], times,
                               step, guidance, size)
        out.append(teacher.decode(lat).cpu())
    return torch.cat(out)
