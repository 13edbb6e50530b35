"""Stable Diffusion 1.x/2.x: UNet2DConditionModel on a DDPM table, CLIP text encoder (also the toy teacher)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion.param import DIFFUSERS_PREDICTION
from fewstep.diffusion.schedule import DiscreteVP
from fewstep.models.families.base import (Cond, vae_decode, vae_encode, vp_student_scheduler,
                                          vp_student_timesteps)


def guidance_embedding(net: nn.Module, cond: Cond, batch: int, device: torch.device) -> Tensor | None:
    """LCM's w-embedding (Luo et al. 2023, §4.2) for UNets built with `time_cond_proj_dim`: embeds w - 1,
    exactly as diffusers' pipelines do, so a full student exported with it runs in the stock pipeline."""
    dim = getattr(net.config, "time_cond_proj_dim", None)
    if dim is None:
        return None
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline)

    w = cond.get("guidance")
    w = torch.ones(batch) if w is None else w.detach().float().cpu().reshape(-1).expand(batch)
    # diffusers builds its frequency table on the CPU, so the scales go in on the CPU (as its pipelines pass them)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
    return emb.to(device, non_blocking=True)


def vp_teacher_times(pipe: Any, steps: int) -> Tensor:
    """The teacher's own DDIM grid (its scheduler config's spacing) as t in [0, 1], ending at 0."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    n = sched.config.num_train_timesteps
    return torch.cat([sched.timesteps.double() / (n - 1), torch.zeros(1, dtype=torch.float64)])


class SDFamily:
    name = "sd"
    net_attr = "unet"
    lora_prefix = "unet"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' text-to-image LoRA script

    @property
    def pipeline_cls(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def schedule(self, pipe: Any) -> DiscreteVP:
        return DiscreteVP(pipe.scheduler.alphas_cumprod.clone().float())

    def prediction(self, pipe: Any) -> str:
        return DIFFUSERS_PREDICTION[pipe.scheduler.config.prediction_type]

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond:
        emb, _ = pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, False)
        return {"encoder_hidden_states": emb.float()}

    def null_cond(self, pipe: Any, n: int) -> Cond:
        return self.encode_prompts(pipe, [""] * n)

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        tc = guidance_embedding(net, cond, len(x), x.device)
        ehs = cond["encoder_hidden_states"].to(x.dtype)
        return net(x, timestep, encoder_hidden_states=ehs, timestep_cond=None if tc is None else tc.to(x.dtype)).sample

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor
        return (pipe.unet.config.in_channels, height // f, width // f)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def encode_images(self, pipe: Any, images: Tensor, generator: Any = None) -> Tensor:
        return vae_encode(pipe.vae, images, generator=generator)

    def decode(self, pipe: Any, x0: Tensor, grad: bool = False) -> Tensor:
        return vae_decode(pipe.vae, x0, grad)

    def teacher_times(self, pipe: Any, steps: int, height: int, width: int) -> Tensor:
        return vp_teacher_times(pipe, steps)

    def student_scheduler(self, pipe: Any, step: str = "consistency") -> tuple[str, dict]:
        return vp_student_scheduler(pipe, step)

    def student_timesteps(self, pipe: Any, times: Tensor, height: int, width: int) -> list:
        return vp_student_timesteps(self.schedule(pipe), times[:-1])

    def pipeline_call_kwargs(self, pipe: Any, times: Tensor, height: int, width: int) -> dict:
        return {"timesteps": self.student_timesteps(pipe, times, height, width)}
