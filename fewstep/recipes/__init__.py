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
from fewstep.recipes.lcm import LCM

RECIPES: dict[str, type[Recipe]] = {"lcm": LCM}


def inference_spec(cfg: DictConfig, teacher: Teacher, step: str) -> InferenceSpec:
    times = list(cfg.sample.timesteps)
    if times:
        if times[-1] != 0:
            times.append(0.0)
        if any(a <= b for a, b in zip(times, times[1:])):
            raise FewstepError(f"sample.timesteps must decrease in (0, 1] towards 0 (got {list(cfg.sample.timesteps)})")
    else:
        times = [float(t) for t in teacher.student_times(cfg.sample.steps, cfg.teacher.resolution or None)]
    return InferenceSpec(times=times, step=step, guidance_scale=float(cfg.sample.guidance_scale))


def build_student(cfg: DictConfig, teacher: Teacher, guidance_embedding: bool = False) -> tuple[torch.nn.Module, Any]:
    """(trainable student network, frozen teacher denoiser)."""
    if cfg.student.mode == "lora":
        if guidance_embedding:
            raise FewstepError("method.guidance_embedding=true needs student.mode=full (a LoRA cannot add the "
                               "embedding layer); set student.mode=full or method.guidance_embedding=false")
        lora = cfg.student.lora
        targets = list(lora.targets) or list(teacher.family.lora_targets)
        net = add_lora(teacher.net, lora.rank, lora.alpha, targets, lora.init_scale, cfg.train.seed)
        return net, WithAdapter(teacher.denoiser(net), None)
    base = add_guidance_embedding(teacher.net) if guidance_embedding else teacher.net
    return full_copy(base), teacher.denoiser()


def build_recipe(cfg: DictConfig, teacher: Teacher) -> Recipe:
    cls = RECIPES[cfg.algorithm]
    method = OmegaConf.to_object(cfg.method)
    if cfg.algorithm == "lcm":
        student, real = build_student(cfg, teacher, method.guidance_embedding)
        if cfg.student.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return cls(teacher=teacher, student=student, teacher_denoiser=real, config=method,
                   inference=inference_spec(cfg, teacher, "consistency"), lora=cfg.student.mode == "lora")
    raise FewstepError(f"no builder for algorithm {cfg.algorithm!r}")
