"""Builder pieces shared by the recipes' `build_*` functions: the student network, the sampler spec and its
times. Builders read the validated run config and pass typed arguments to the recipe classes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from fewstep.errors import FewstepError
from fewstep.models.adapters import WithAdapter, enable_checkpointing
from fewstep.models.student import add_guidance_embedding, add_lora, full_copy
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import InferenceSpec


def on_table(times: list[float], teacher: Teacher) -> list[float]:
    """Explicit student times on a DDPM-table teacher, moved down to the table entry at or below each time
    (t = 0.375 with 1000 entries -> index 374 -> 374/999), so the stock LCMScheduler, which takes integer
    timesteps, runs exactly the grid the student was trained on. Flow teachers take any sigma."""
    sched = teacher.schedule
    if sched.kind != "vp":
        return times
    index = sched.model_timestep(torch.tensor(times, dtype=torch.float64)).floor()
    return [float(t) for t in sched.to_t(index)]


def inference_spec(cfg: DictConfig, teacher: Teacher, step: str, default_times: Any = None) -> InferenceSpec:
    times = list(cfg.sample.timesteps)
    if times:
        if times[-1] != 0:
            times.append(0.0)
        times = on_table(times, teacher)
        if any(a <= b for a, b in zip(times, times[1:])):
            raise FewstepError(f"sample.timesteps must decrease in (0, 1] towards 0 and map to distinct teacher "
                               f"timesteps (got {list(cfg.sample.timesteps)})")
    elif default_times is not None:
        times = [float(t) for t in default_times(teacher, cfg.sample.steps)]
    else:
        times = [float(t) for t in teacher.student_times(cfg.sample.steps, cfg.teacher.resolution or None)]
    return InferenceSpec(times=times, step=step, guidance_scale=float(cfg.sample.guidance_scale))


def build_student(cfg: DictConfig, teacher: Teacher, guidance_embedding: bool = False,
                  embedding_dim: int = 256) -> tuple[torch.nn.Module, Any]:
    """(trainable student network, frozen teacher denoiser); `guidance_embedding` adds LCM's w-embedding of
    `embedding_dim` to a full student."""
    if cfg.student.mode == "lora":
        lora = cfg.student.lora
        targets = list(lora.targets) or list(teacher.family.lora_targets)
        net = add_lora(teacher.net, lora.rank, lora.alpha, targets, lora.init_scale, cfg.train.seed)
        return net, WithAdapter(teacher.denoiser(net), None)
    base = add_guidance_embedding(teacher.net, embedding_dim) if guidance_embedding else teacher.net
    return full_copy(base), teacher.denoiser()


def dmd_student_times(teacher: Teacher, steps: int) -> torch.Tensor:
    """DMD2's fixed student grid: range(T - 1, 0, -T // K) on DDPM tables (999, 749, 499, 249 for K = 4); the
    teacher's own (shifted) K-step grid for flow teachers. Ends at 0."""
    sched = teacher.schedule
    if sched.kind == "vp":
        n = sched.num_train_timesteps
        idx = torch.arange(n - 1, 0, -(n // steps), dtype=torch.float64)[:steps]
        return torch.cat([idx / (n - 1), torch.zeros(1, dtype=torch.float64)])
    return teacher.teacher_times(steps)


@dataclass
class StudentAndCritic:
    """A student and a fake-score critic initialised from the teacher (DMD2, TDM)."""

    net: torch.nn.Module                            # the student network the export writes
    student: torch.nn.Module                        # its denoiser (the live adapter in LoRA mode)
    student_params: dict[str, torch.nn.Parameter]
    critic: torch.nn.Module                         # the critic's denoiser
    critic_net: torch.nn.Module
    critic_params: dict[str, torch.nn.Parameter]


def build_student_and_critic(cfg: DictConfig, teacher: Teacher, critic_mode: str, critic_rank: int,
                             critic_alpha: float) -> StudentAndCritic:
    """Student and critic on one frozen base where both are LoRA adapters ("default" and "critic"); a full
    critic is copied from the clean base before any adapter is added. Enables the student's gradient
    checkpointing when asked."""
    from fewstep.models.adapters import STUDENT, adapter_parameters
    from fewstep.recipes.critic import build_critic

    targets = list(cfg.student.lora.targets) or list(teacher.family.lora_targets)
    critic = build_critic(teacher, "full", 0, 0, targets) if critic_mode == "full" else None
    net, _ = build_student(cfg, teacher)
    if critic is None:
        critic = build_critic(teacher, "lora", critic_rank, critic_alpha, targets)
    lora = cfg.student.mode == "lora"
    if cfg.student.gradient_checkpointing:
        enable_checkpointing(net)
    return StudentAndCritic(net=net,
                            student=WithAdapter(teacher.denoiser(net), STUDENT) if lora else teacher.denoiser(net),
                            student_params=adapter_parameters(net, STUDENT) if lora else dict(net.named_parameters()),
                            critic=critic[0], critic_net=critic[1], critic_params=critic[2])
