"""The contract a model family implements. Everything family-specific (prompt encoding, latent packing, timestep
units, LoRA component names, export scheduler) lives behind it, so recipes never branch on a family.

Conditions are dicts of tensors batched on dim 0 (so CFG can concatenate them). The key "guidance" (a [B] tensor,
Imagen convention w) is optional: families whose network embeds a guidance scale (LCM's w-embedding on UNets,
FLUX.1-dev's guidance input) read it; others ignore it.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule

Cond = dict[str, Tensor]


class Family(Protocol):
    name: str
    pipeline_cls: type            # the diffusers pipeline class (save_lora_weights / from_pretrained)
    net_attr: str                 # "unet" or "transformer"
    lora_prefix: str              # prefix of LoRA keys in a diffusers LoRA file ("unet" / "transformer")

    def schedule(self, pipe: Any) -> Schedule: ...

    def prediction(self, pipe: Any) -> str: ...

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond: ...

    def null_cond(self, pipe: Any, n: int) -> Cond: ...

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor: ...

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]: ...

    def default_size(self, pipe: Any) -> int: ...

    def encode_images(self, pipe: Any, images: Tensor, generator: Any = None) -> Tensor: ...

    def decode(self, pipe: Any, x0: Tensor, grad: bool = False) -> Tensor: ...

    def teacher_times(self, pipe: Any, steps: int, height: int, width: int) -> Tensor: ...

    def student_scheduler(self, pipe: Any, step: str = "consistency") -> tuple[str, dict]: ...

    def student_timesteps(self, pipe: Any, times: Tensor, height: int, width: int) -> list: ...

    def pipeline_call_kwargs(self, pipe: Any, times: Tensor, height: int, width: int) -> dict: ...


CALL_DEFAULTS_ATTR = "_fewstep_call_defaults"   # set on a pipeline object by fewstep.models.teacher.load_pipeline


def recorded_call_defaults(pipe: Any) -> dict[str, Any]:
    """`__call__` arguments recorded with a teacher folder (model_index.json's `_fewstep_call_defaults`, kept on
    the loaded pipeline object): values the teacher was trained with that differ from the pipeline's defaults,
    which every call of it, ours and a stock one, must pass. Empty for ordinary teachers."""
    return dict(getattr(pipe, CALL_DEFAULTS_ATTR, None) or {})


def vae_scale(vae: nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers VAE; shift is 0 for SD1.5/SDXL."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(vae.config.scaling_factor), float(shift)


@torch.no_grad()
def vae_encode(vae: nn.Module, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Images in [-1, 1] -> model latents x0 = (z - shift) * scale."""
    scale, shift = vae_scale(vae)
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return ((z.float() - shift) * scale)


def vae_decode(vae: nn.Module, x0: Tensor, grad: bool = False) -> Tensor:
    """Model latents -> images in [0, 1] (float32). `grad=True` keeps the graph from x0 through the (frozen) VAE
    decoder, for rewards trained on (reward backprop); the clamp passes no gradient outside [0, 1]."""
    scale, shift = vae_scale(vae)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = x0 / scale + shift
        img = vae.decode(z.to(vae.device, vae.dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)


def vp_student_scheduler(pipe: Any, step: str = "consistency") -> tuple[str, dict]:
    """The stock scheduler that runs a student's sampler on the teacher's DDPM table: LCMScheduler for the
    consistency step (LCM, DMD2, Phased DMD); EulerDiscreteScheduler for deterministic DDIM ("ddim", TDM): Euler on
    x / alpha in sigma = sigma_t / alpha_t is DDIM with eta = 0 step for step, and with explicit `timesteps` its
    sigmas are the table's own values, ending at 0. timestep_spacing="leading" only sets init_noise_sigma to
    sqrt(sigma_max^2 + 1) = 1 / alpha, so the pipeline's scaled input at the first step is the plain noise the
    student was trained on (with "trailing" it would be sigma_max, off by a factor alpha)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    from fewstep.sampling.steps import parse_step

    step = parse_step(step)[0]
    if step == "dpmsolver":   # fewstep.sampling.steps.DPMSolver2M: DPM-Solver++(2M), first order at both ends
        sched = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            final_sigmas_type="zero", use_karras_sigmas=False, thresholding=False)
        return "DPMSolverMultistepScheduler", dict(sched.config)
    if step in ("ddim", "euler", "cps"):   # CPS: the stock call adds its noise in callback_on_step_end (README)
        sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config, final_sigmas_type="zero",
                                                   use_karras_sigmas=False, timestep_spacing="leading")
        return "EulerDiscreteScheduler", dict(sched.config)
    sched = LCMScheduler.from_config(pipe.scheduler.config)
    return "LCMScheduler", dict(sched.config)


def vp_student_timesteps(schedule: Any, times: Tensor) -> list[int]:
    """t in [0, 1] -> the integer diffusers timesteps a stock LCMScheduler takes (times must be on the table)."""
    idx = schedule.model_timestep(times).round().long()
    return [int(i) for i in idx]
