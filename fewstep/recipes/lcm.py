"""Latent consistency distillation (Luo et al. 2023, Alg. 1; LCM-LoRA, Luo et al. 2023b). algorithms.md §1."""
from __future__ import annotations

import copy
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import Schedule
from fewstep.methods.lcm import LCMConfig
from fewstep.models.adapters import enable_checkpointing
from fewstep.models.denoiser import Guided
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.sampling.draws import Draws, randint, randn, uniform
from fewstep.recipes.build import build_student, inference_spec
from fewstep.recipes.losses import consistency_loss, ema_update
from fewstep.sampling.steps import consistency_x0, ddim_transfer


def solver_grid(teacher: Teacher, num_steps: int) -> Tensor:
    """Ascending times [t_0 = 0, t_1, ..., t_N]: a sample starts at t_{i+1} and the teacher hops to t_i.
    DDPM tables use LCM's skipping grid tau_i = (i + 1) k - 1 with the hop from tau_0 landing on index 0
    (algorithms.md §1.3); flow teachers use their own (shifted) Euler grid."""
    sched = teacher.schedule
    if sched.kind == "vp":
        n = sched.num_train_timesteps
        k = n // num_steps
        idx = torch.tensor([0] + [(i + 1) * k - 1 for i in range(num_steps)], dtype=torch.float64)
        return idx / (n - 1)
    return teacher.teacher_times(num_steps).flip(0)


class LCM(Recipe):
    """Consistency distillation: f_theta(x_{t_{n+k}}) matches the target net at the teacher's CFG-DDIM hop."""

    Config: ClassVar[type] = LCMConfig
    name: ClassVar[str] = "lcm"

    def __init__(self, *, student: nn.Module, student_net: nn.Module, real: nn.Module, target: nn.Module,
                 target_net: nn.Module | None, schedule: Schedule, grid: Tensor, config: LCMConfig,
                 inference: InferenceSpec) -> None:
        """`student`/`target` are the denoisers of `student_net` and of the EMA `target_net` (LoRA students have
        none: the target is the online student under no_grad); `grid` is the solver grid of `solver_grid`."""
        self.cfg, self.spec, self.schedule, self.grid = config, inference, schedule, grid
        self.student, self.student_net, self.real = student, student_net, real
        self.target, self.target_net = target, target_net

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student_net}

    def inference(self) -> InferenceSpec:
        return self.spec

    def _with_guidance(self, cond: dict[str, Tensor], w: Tensor) -> dict[str, Tensor]:
        return {**cond, "guidance": w} if self.cfg.guidance_embedding else cond

    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        x0, dev, gen = batch.x0, batch.x0.device, draws.sample
        i = randint(gen, self.cfg.num_ddim_timesteps, len(x0))
        t, t_prev = self.grid[i + 1].to(dev), self.grid[i].to(dev)           # t_{n+k}, t_n
        x_t = diffuse(x0, t, self.schedule, randn(x0.shape, gen))           # Alg. 1: forward diffusion
        w = uniform(gen, len(x0), self.cfg.guidance_min, self.cfg.guidance_max, dev)
        cond = self._with_guidance(batch.cond, w)
        pred = consistency_x0(x_t, self.student(x_t, t, cond), t, self.schedule)
        with torch.no_grad():
            x0_w = Guided(self.real, w)(x_t, t, {"pos": batch.cond, "neg": batch.neg})  # teacher CFG estimate
            x_prev = ddim_transfer(x_t, x0_w, t, t_prev, self.schedule)             # one DDIM hop (solver)
            target = consistency_x0(x_prev, self.target(x_prev, t_prev, cond), t_prev, self.schedule)
        loss = consistency_loss(pred, target, self.cfg.loss, self.cfg.huber_c)
        return StepOutput({"student": loss}, {"w_mean": float(w.mean())})

    def after_optimizer_step(self, step: int) -> None:
        if self.target_net is not None:
            ema_update(list(self.target_net.parameters()), list(self.student_net.parameters()),
                       self.cfg.target_ema_decay)

    def followers(self) -> list[nn.Module]:
        return [] if self.target_net is None else [self.target_net]

    def extra_state(self) -> dict[str, Tensor]:
        if self.target_net is None:
            return {}
        return {f"target.{k}": v for k, v in self.target_net.state_dict().items()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if self.target_net is None:
            return super().load_extra_state(state)
        self.target_net.load_state_dict({k[len("target."):]: v for k, v in state.items()})

    def export_net(self) -> nn.Module:
        """The diffusers LCM scripts ship the EMA target network in full mode; LoRA mode ships the adapter."""
        return self.student_net if self.target_net is None else self.target_net


def build_lcm(cfg: DictConfig, teacher: Teacher) -> LCM:
    """LCM from a validated run config: a LoRA on the frozen base or a full copy (optionally with the
    w-embedding), sampled with the consistency step on the student grid."""
    method = OmegaConf.to_object(cfg.method)
    student, real = build_student(cfg, teacher, method.guidance_embedding, method.embedding_dim)
    if cfg.student.gradient_checkpointing:
        enable_checkpointing(student)
    target_net = None if cfg.student.mode == "lora" else copy.deepcopy(student).requires_grad_(False)
    online = teacher.denoiser(student)
    return LCM(student=online, student_net=student, real=real,
               target=online if target_net is None else teacher.denoiser(target_net), target_net=target_net,
               schedule=teacher.schedule, grid=solver_grid(teacher, method.num_ddim_timesteps), config=method,
               inference=inference_spec(cfg, teacher, "consistency"))
