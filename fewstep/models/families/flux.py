"""FLUX.1: FluxTransformer2DModel on rectified flow over 2x2-packed latents, CLIP-L (pooled) + T5.

fewstep's x is the UNPACKED latent [B, C, H, W] (what the VAE gives, after shift/scale), so every generic piece
(noise, schedules, losses) works on ordinary 4-D tensors; `FluxFamily.call` packs to tokens, runs the transformer
and unpacks. The transformer takes timestep = sigma (it multiplies by 1000 itself), hence
`RectifiedFlow(timestep_scale=1.0)`. Guidance-distilled checkpoints (`guidance_embeds=True`, FLUX.1-dev) take the
guidance scale as an input: `cond["guidance"]` ([B]) when given, else the pipeline's default 3.5.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import RectifiedFlow
from fewstep.errors import FewstepError
from fewstep.models.families.base import Cond, vae_decode, vae_encode
from fewstep.models.families.sd3 import (flow_student_scheduler, flow_student_sigmas, flow_teacher_times,
                                         pipeline_default, scheduler_mu)

DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__(guidance_scale=3.5)


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], the token layout of `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise FewstepError(f"FLUX latents need even height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width` (`FluxPipeline._unpack_latents`, which
    takes pixel sizes; these are latent sizes)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Positional ids [(H/2)(W/2), 3] of the packed image tokens (`FluxPipeline._prepare_latent_image_ids`):
    (0, row, col) per token. Constant per resolution, so built here rather than carried in the cond."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def guidance_input(net: nn.Module, cond: Cond, batch: int, device: torch.device) -> Tensor | None:
    """The transformer's `guidance` argument: None for models without a guidance embedding (FLUX.1-schnell),
    else `cond["guidance"]` or the pipeline default 3.5, as a float32 [B] tensor (what `FluxPipeline` passes)."""
    if not getattr(net.config, "guidance_embeds", False):
        return None
    w = cond.get("guidance")
    if w is None:
        return torch.full((batch,), DEFAULT_GUIDANCE, device=device, dtype=torch.float32)
    return w.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)


class FluxFamily:
    """`FluxPipeline` glue. Cond keys: `encoder_hidden_states` [B, 512, 4096] (T5), `pooled_projections` [B, 768]
    (CLIP pooled), optional `guidance` [B]. FLUX.1-dev has no true CFG by default; the "" encoding is its
    null condition (what the pipeline's true-CFG path would use with negative_prompt="")."""

    name = "flux"
    net_attr = "transformer"
    lora_prefix = "transformer"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def pipeline_cls(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def schedule(self, pipe: Any) -> RectifiedFlow:
        """`FluxPipeline` passes `timestep / 1000` = sigma; the transformer scales it by 1000 internally."""
        return RectifiedFlow(timestep_scale=1.0)

    def prediction(self, pipe: Any) -> str:
        return "flow"

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond:
        """`FluxPipeline.encode_prompt` (prompt_2 = prompt) at the pipeline's default T5 length; its `text_ids`
        are all zeros and per-length constant, so `call` rebuilds them."""
        emb, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=pipe.text_encoder.device,
                                            num_images_per_prompt=1,
                                            max_sequence_length=pipeline_default(pipe, "max_sequence_length"))
        return {"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()}

    def null_cond(self, pipe: Any, n: int) -> Cond:
        return self.encode_prompts(pipe, [""] * n)

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        """Pack, run the transformer as `FluxPipeline.__call__` does (img/txt ids, guidance), unpack."""
        _, _, h, w = x.shape
        ehs = cond["encoder_hidden_states"].to(x.dtype)
        txt_ids = torch.zeros(ehs.shape[1], 3, device=x.device, dtype=x.dtype)
        out = net(hidden_states=pack_latents(x), timestep=timestep.to(x.dtype),
                  guidance=guidance_input(net, cond, len(x), x.device),
                  pooled_projections=cond["pooled_projections"].to(x.dtype), encoder_hidden_states=ehs,
                  txt_ids=txt_ids, img_ids=image_ids(h, w, x.device, x.dtype)).sample
        return unpack_latents(out, h, w)

    def draw_noise(self, shape: Sequence[int], generator: Any, device: Any, dtype: torch.dtype) -> Tensor:
        """Gaussian noise drawn in the pipeline's packed token layout, then unpacked: the same generators give
        the same noise as `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` inside `FluxPipeline`."""
        from fewstep.sampling.steps import randn

        b, c, h, w = shape
        tokens = randn((b, (h // 2) * (w // 2), c * 4), generator, device, dtype)
        return unpack_latents(tokens, h, w)

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """Unpacked latent shape; like `FluxPipeline.prepare_latents`, sizes round down to an even latent."""
        f2 = pipe.vae_scale_factor * 2
        return (pipe.transformer.config.in_channels // 4, 2 * (height // f2), 2 * (width // f2))

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def encode_images(self, pipe: Any, images: Tensor, generator: Any = None) -> Tensor:
        return vae_encode(pipe.vae, images, generator=generator)

    def decode(self, pipe: Any, x0: Tensor, grad: bool = False) -> Tensor:
        return vae_decode(pipe.vae, x0, grad)

    def teacher_times(self, pipe: Any, steps: int, height: int, width: int) -> Tensor:
        """`FluxPipeline.__call__`'s grid: sigmas = linspace(1, 1/steps, steps), dynamically shifted with `mu`
        from the packed image-token count (ignored by schedulers without `use_dynamic_shifting`), then 0."""
        _, h, w = self.latent_shape(pipe, height, width)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return flow_teacher_times(pipe, steps, sigmas=sigmas, mu=scheduler_mu(pipe, (h // 2) * (w // 2)))

    def student_scheduler(self, pipe: Any, step: str = "consistency") -> tuple[str, dict]:
        return flow_student_scheduler(pipe, step)

    def student_timesteps(self, pipe: Any, times: Tensor, height: int, width: int) -> list:
        return flow_student_sigmas(times)

    def pipeline_call_kwargs(self, pipe: Any, times: Tensor, height: int, width: int) -> dict:
        sigmas = self.student_timesteps(pipe, times, height, width)
        return {"sigmas": sigmas, "num_inference_steps": len(sigmas)}
