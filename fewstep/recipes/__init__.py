"""Recipe registry and the builder that turns a run config into a recipe (configs never reach inside classes)."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fewstep.errors import FewstepError
from fewstep.models.adapters import WithAdapter
from fewstep.models.student import add_guidance_embedding, add_lora, full_copy
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import InferenceSpec, Recipe
from fewstep.recipes.dmd2 import DMD2, dmd_student_times
from fewstep.recipes.lcm import LCM
from fewstep.recipes.phased_dmd import PhasedDMD

RECIPES: dict[str, type[Recipe]] = {"lcm": LCM, "dmd2": DMD2, "phased_dmd": PhasedDMD}


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


def build_recipe(cfg: DictConfig, teacher: Teacher) -> Recipe:
    cls = RECIPES[cfg.algorithm]
    method = OmegaConf.to_object(cfg.method)
    if cfg.algorithm == "lcm":
        student, real = build_student(cfg, teacher, method.guidance_embedding, method.embedding_dim)
        if cfg.student.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return cls(teacher=teacher, student=student, teacher_denoiser=real, config=method,
                   inference=inference_spec(cfg, teacher, "consistency"), lora=cfg.student.mode == "lora")
    if cfg.algorithm == "dmd2":
        return build_dmd2(cfg, teacher, method)
    if cfg.algorithm == "phased_dmd":
        return build_phased_dmd(cfg, teacher, method)
    raise FewstepError(f"no builder for algorithm {cfg.algorithm!r}")


def build_dmd2(cfg: DictConfig, teacher: Teacher, method: Any) -> Recipe:
    """Student and critic on one frozen base where both are LoRA adapters ("default" and "critic"); a full
    critic is copied from the clean base before any adapter is added."""
    from fewstep.models.adapters import STUDENT, adapter_parameters
    from fewstep.recipes.critic import build_critic

    targets = list(cfg.student.lora.targets) or list(teacher.family.lora_targets)
    critic = build_critic(teacher, "full", 0, 0, targets) if method.critic_mode == "full" else None
    student, _ = build_student(cfg, teacher)
    if critic is None:
        critic = build_critic(teacher, "lora", method.critic_rank, method.critic_alpha, targets)
    lora = cfg.student.mode == "lora"
    student_params = adapter_parameters(student, STUDENT) if lora else dict(student.named_parameters())
    student_den = WithAdapter(teacher.denoiser(student), STUDENT) if lora else teacher.denoiser(student)
    real = WithAdapter(teacher.denoiser(teacher.net), None)
    if cfg.student.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    spec = inference_spec(cfg, teacher, "consistency", dmd_student_times)
    return DMD2(teacher=teacher, student=student, student_params=student_params, real=real, critic=critic[0],
                critic_params=critic[2], config=method, inference=spec, student_denoiser=student_den)


def build_phased_dmd(cfg: DictConfig, teacher: Teacher, method: Any) -> Recipe:
    """One expert ("phase<k>") and one critic per phase (algorithms.md §4.1): LoRA adapters on the frozen base, or
    full trainable copies (student.mode=full, method.critic_mode=full). Copies are taken from the clean base before
    any adapter is added to it."""
    names = [f"phase{k}" for k in range(len(method.phase_steps))]
    targets = list(cfg.student.lora.targets) or list(teacher.family.lora_targets)
    teacher.net.requires_grad_(False)
    critics = phase_critics(teacher, method, targets, len(names)) if method.critic_mode == "full" else None
    net, expert_params = phase_experts(cfg, teacher, names, targets)
    critics = critics or phase_critics(teacher, method, targets, len(names))
    spec = inference_spec(cfg, teacher, "consistency", dmd_student_times)
    bounds = [float(spec.times[sum(method.phase_steps[:k + 1])]) for k in range(len(names))]
    spec.experts = [(name, b) for name, b in zip(names, bounds)]
    return PhasedDMD(teacher=teacher, net=net, experts=names, expert_params=expert_params, critics=critics[0],
                     critic_params=critics[1], real=WithAdapter(teacher.denoiser(teacher.net), None), config=method,
                     inference=spec, total_steps=cfg.train.steps)


def phase_experts(cfg: DictConfig, teacher: Teacher, names: list[str],
                  targets: list[str]) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """(network holding the experts, their trainable parameters): one LoRA adapter per name on the frozen base
    (student.mode=lora), or an nn.ModuleDict of full trainable copies of the teacher network keyed by name."""
    from fewstep.models.adapters import add_named_adapter

    if cfg.student.mode == "full":
        net: torch.nn.Module = torch.nn.ModuleDict({name: full_copy(teacher.net) for name in names})
        params = dict(net.named_parameters())
        nets = list(net.values())
    else:
        lora, net, params, nets = cfg.student.lora, teacher.net, {}, [teacher.net]
        for name in names:
            params.update(add_named_adapter(net, name, lora.rank, lora.alpha, targets))
    if cfg.student.gradient_checkpointing:
        for m in nets:
            m.enable_gradient_checkpointing()
    return net, params


def phase_critics(teacher: Teacher, method: Any, targets: list[str],
                  n: int) -> tuple[list[torch.nn.Module], dict[str, torch.nn.Parameter]]:
    """(critic denoiser per phase, all their trainable parameters): LoRA adapters "critic<k>" on the frozen base,
    or full copies (method.critic_mode=full) whose parameter names get a "critic<k>." prefix."""
    from fewstep.recipes.critic import build_critic

    critics, params = [], {}
    for k in range(n):
        name = f"critic{k}"
        den, _, p = build_critic(teacher, method.critic_mode, method.critic_rank, method.critic_alpha, targets, name=name)
        critics.append(den)
        params.update(p if method.critic_mode == "lora" else {f"{name}.{key}": v for key, v in p.items()})
    return critics, params
