"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT) on rectified flow, CLIP-L + CLIP-G (+ optional T5).

Flow prediction u = eps - x0; the transformer takes timestep = 1000 * sigma. The teacher grid is whatever the
pipeline's FlowMatchEulerDiscreteScheduler produces (static `shift`, or dynamic shift when its config says so).
The flow helpers here are shared with FLUX.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import RectifiedFlow, flux_mu
from fewstep.models.families.base import Cond, recorded_call_defaults, vae_decode, vae_encode


def pipeline_default(pipe_or_cls: Any, arg: str) -> Any:
    """The value of one `__call__` argument this teacher is called with: the one recorded with the teacher folder
    (`recorded_call_defaults`; the SD3 toy's `max_sequence_length` 8), else the pipeline's own default (e.g.
    `max_sequence_length`: 256 for SD3, 512 for FLUX, 120 for PixArt-alpha, 300 for PixArt-sigma), so encoding
    mirrors the teacher's pipeline call."""
    recorded = {} if isinstance(pipe_or_cls, type) else recorded_call_defaults(pipe_or_cls)
    if arg in recorded:
        return recorded[arg]
    cls = pipe_or_cls if isinstance(pipe_or_cls, type) else type(pipe_or_cls)
    return inspect.signature(cls.__call__).parameters[arg].default


def scheduler_mu(pipe: Any, image_seq_len: int) -> float:
    """The pipelines' `calculate_shift` on the scheduler config (base/max image_seq_len and shift)."""
    cfg = pipe.scheduler.config
    return flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                   cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def flow_teacher_times(pipe: Any, steps: int, sigmas: Sequence[float] | None = None,
                       mu: float | None = None) -> Tensor:
    """The sigma grid (ending at 0) that `FlowMatchEulerDiscreteScheduler.set_timesteps` builds from the
    pipeline's scheduler config, shift included: exactly the grid the stock pipeline integrates on."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
    return sched.sigmas.double().cpu()


def flow_student_scheduler(pipe: Any, step: str = "consistency") -> tuple[str, dict]:
    """FlowMatchEulerDiscreteScheduler with shifting switched off (shift 1, no dynamic shift), so the student's
    own sigmas passed as `sigmas=` reach the pipeline unchanged (algorithms.md §0.3: a shifting scheduler would
    shift already-shifted sigmas a second time), and with `stochastic_sampling`: x0, then fresh noise at the next
    sigma, the flow form of multistep consistency sampling (`consistency_step`); without it for deterministic
    students (step "ddim"/"euler", TDM), whose Euler step on x0 predictions is DDIM, and for CPS students (step
    "cps:eta=..."), whose stock call turns each Euler step into the CPS step in `callback_on_step_end` (README)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.sampling.steps import parse_step

    sched = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False,
        stochastic_sampling=parse_step(step)[0] not in ("ddim", "euler", "cps"))
    return "FlowMatchEulerDiscreteScheduler", dict(sched.config)


def flow_student_sigmas(times: Tensor) -> list[float]:
    """t grid (ending at 0) -> the `sigmas=` list for the pipeline call (the scheduler appends the final 0)."""
    return [float(s) for s in times[:-1]]


class SD3Family:
    """`StableDiffusion3Pipeline` glue. Cond keys: `encoder_hidden_states` [B, 77 + T5 length, 4096] and
    `pooled_projections` [B, 2048]; the unconditional branch encodes "" (the pipeline's default negative).
    With `text_encoder_3=None` the pipeline (and so this family) uses zeros for the T5 part."""

    name = "sd3"
    net_attr = "transformer"
    lora_prefix = "transformer"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def pipeline_cls(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def schedule(self, pipe: Any) -> RectifiedFlow:
        """The pipeline passes `scheduler.timesteps` = sigma * num_train_timesteps (1000) to the transformer."""
        return RectifiedFlow(timestep_scale=float(pipe.scheduler.config.num_train_timesteps))

    def prediction(self, pipe: Any) -> str:
        return "flow"

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond:
        """`StableDiffusion3Pipeline.encode_prompt` without CFG, at the pipeline's default T5 length."""
        device = pipe.text_encoder.device
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=pipeline_default(pipe, "max_sequence_length"))
        return {"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()}

    def null_cond(self, pipe: Any, n: int) -> Cond:
        """The pipeline's negative branch with no negative prompt: "" through all encoders."""
        return self.encode_prompts(pipe, [""] * n)

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype),
                   pooled_projections=cond["pooled_projections"].to(x.dtype)).sample

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, height // f, width // f)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def encode_images(self, pipe: Any, images: Tensor, generator: Any = None) -> Tensor:
        return vae_encode(pipe.vae, images, generator=generator)

    def decode(self, pipe: Any, x0: Tensor, grad: bool = False) -> Tensor:
        return vae_decode(pipe.vae, x0, grad)

    def teacher_times(self, pipe: Any, steps: int, height: int, width: int) -> Tensor:
        """The pipeline's grid: default `set_timesteps(steps)` (static shift); with `use_dynamic_shifting`, `mu`
        from the patch-token count as `StableDiffusion3Pipeline.__call__` computes it."""
        mu = None
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            _, h, w = self.latent_shape(pipe, height, width)
            p = pipe.transformer.config.patch_size
            mu = scheduler_mu(pipe, (h // p) * (w // p))
        return flow_teacher_times(pipe, steps, mu=mu)

    def student_scheduler(self, pipe: Any, step: str = "consistency") -> tuple[str, dict]:
        return flow_student_scheduler(pipe, step)

    def student_timesteps(self, pipe: Any, times: Tensor, height: int, width: int) -> list:
        return flow_student_sigmas(times)

    def pipeline_call_kwargs(self, pipe: Any, times: Tensor, height: int, width: int) -> dict:
        sigmas = self.student_timesteps(pipe, times, height, width)
        return {"sigmas": sigmas, "num_inference_steps": len(sigmas)}
