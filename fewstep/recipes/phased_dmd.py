"""Phased DMD (Fan et al. 2025; algorithms.md §4): the student's steps are split into K phases over the noise
range, each served by its own expert (a LoRA adapter on the frozen base, or a full trainable copy of the teacher
network, §4.1); phase k matches the distribution of its *noisy* output at the phase boundary s_k, so its critic
learns with the subinterval score-matching target of §4.2. The last phase (s = 0) is plain DMD. Phases train
progressively (phase 0 first) or alternately."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import diffuse
from fewstep.methods import PhasedDMDConfig
from fewstep.models.adapters import WithAdapter, expert_denoiser
from fewstep.models.student import full_copy
from fewstep.models.teacher import Teacher
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput, uniform
from fewstep.recipes.build import inference_spec
from fewstep.recipes.dmd2 import dmd_student_times, teacher_cond_uncond



def phase_bounds(phase_steps: list[int], times: list[float]) -> list[tuple[int, int, float]]:
    """(first step, end step, boundary time s_k) per phase; s_k is the time of the next phase's first step, and 0
    for the last phase."""
    out, start = [], 0
    for k, n in enumerate(phase_steps):
        end = start + n
        out.append((start, end, 0.0 if k == len(phase_steps) - 1 else float(times[end])))
        start = end
    return out


class PhasedDMD(Recipe):
    """`net` holds the experts named in `experts` (high noise first): the shared frozen base carrying one LoRA
    adapter per expert, or an nn.ModuleDict of full networks keyed by expert name; it is what the export writes."""

    Config: ClassVar[type] = PhasedDMDConfig
    name: ClassVar[str] = "phased_dmd"

    def __init__(self, teacher: Teacher, net: nn.Module, experts: list[str], expert_params: dict[str, nn.Parameter],
                 critics: list[nn.Module], critic_params: dict[str, nn.Parameter], real: nn.Module,
                 config: PhasedDMDConfig, inference: InferenceSpec, total_steps: int) -> None:
        self.cfg, self.teacher, self.spec, self.net = config, teacher, inference, net
        self.schedule, self.experts, self.critics, self.real = teacher.schedule, experts, critics, real
        self.students = [expert_denoiser(teacher.denoiser(net), name) for name in experts]
        self._params = {"student": expert_params, "critic": critic_params}
        self.times = torch.tensor(inference.times, dtype=torch.float64)
        self.bounds = phase_bounds(config.phase_steps, inference.times)
        self.total_steps = total_steps
        self.expert_of_step = [k for k, (a, b, _) in enumerate(self.bounds) for _ in range(a, b)]

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.net, "critic": nn.ModuleList(self.critics)}

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self._params[role]

    def optimizer_settings(self, role: str) -> dict[str, float]:
        return {"lr": self.cfg.critic_lr} if role == "critic" and self.cfg.critic_lr > 0 else {}

    def inference(self) -> InferenceSpec:
        return self.spec

    def export_net(self) -> nn.Module:
        return self.net

    def phase(self, step: int) -> int:
        k = len(self.bounds)
        if self.cfg.schedule == "alternate":
            return step % k
        return min(step * k // max(self.total_steps, 1), k - 1)

    def expert(self, i: int, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Student step i: expert of its phase, x0 estimate at times[i]."""
        return self.students[self.expert_of_step[i]](x, self.times[i].to(x.device).expand(len(x)), cond)

    def train_step(self, batch: Batch, step: int, generator: torch.Generator) -> StepOutput:
        k = self.phase(step)
        losses: dict[str, Tensor] = {}
        if step % self.cfg.critic_steps_per_student_step == 0:
            losses["student"] = self.student_loss(batch, k, generator)
        losses["critic"] = self.critic_loss(batch, k, generator)
        return StepOutput(losses, {"phase": float(k)})

    def _start(self, batch: Batch, generator: torch.Generator) -> Tensor:
        dev = next(iter(batch.cond.values())).device
        return torch.randn((len(batch.prompts), *self.teacher.latent_shape()), generator=generator).to(dev)

    def _rollout(self, x: Tensor, until: int, batch: Batch, generator: torch.Generator) -> Tensor:
        """Inference steps 0..until-1 without grad (re-noising sampler), returning the input of step `until`."""
        with torch.no_grad():
            for i in range(until):
                x = self._renoise(self.expert(i, x, batch.cond), float(self.times[i + 1]), generator)
        return x

    def _renoise(self, x0: Tensor, s: float, generator: torch.Generator) -> Tensor:
        if s == 0:
            return x0
        return diffuse(x0, torch.full((len(x0),), s, device=x0.device), self.schedule,
                       torch.randn(x0.shape, generator=generator))

    def _diffuse(self, anchor: Tensor, s: float, lo: float, hi: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """t ~ U[max(lo, s + margin), hi] and x_t from the subinterval kernel q(x_t | x_s) (§4.2)."""
        t = uniform(generator, len(anchor), max(lo, s + self.cfg.margin) if s > 0 else lo, hi, anchor.device)
        noise = torch.randn(anchor.shape, generator=generator)
        return L.subinterval_noise(anchor, s, t, self.schedule, noise=noise), t

    def student_loss(self, batch: Batch, k: int, generator: torch.Generator) -> Tensor:
        """Draw a step j of phase k, roll out to it, predict x0 with grad, jump to the boundary s_k (the anchor)
        and apply the DMD gradient of the anchor's law to x0_j (the anchor is affine in x0_j, §4.3 item 7)."""
        start, end, s = self.bounds[k]
        j = int(torch.randint(start, end, (1,), generator=generator))
        x0 = self.expert(j, self._rollout(self._start(batch, generator), j, batch, generator), batch.cond)
        with torch.no_grad():
            anchor = self._renoise(x0.detach(), s, generator)
            x_t, t = self._diffuse(anchor, s, self.cfg.dm_t_min, self.cfg.dm_t_max, generator)
            xc, xu = teacher_cond_uncond(self.real, x_t, t, batch)
            x0_real = xu + self.cfg.real_guidance * (xc - xu)
            g = L.dmd_direction(x0, x0_real, self.critics[k](x_t, t, batch.cond), self.cfg.norm_min)
        return L.dmd_loss(x0, g)

    def critic_loss(self, batch: Batch, k: int, generator: torch.Generator) -> Tensor:
        """Critic k learns the score of phase k's output law at t > s_k from the noisy anchor (§4.2 target)."""
        _, end, s = self.bounds[k]
        x = self._rollout(self._start(batch, generator), end - 1, batch, generator)
        with torch.no_grad():
            anchor = self._renoise(self.expert(end - 1, x, batch.cond), s, generator)
            x_t, t = self._diffuse(anchor, s, self.cfg.critic_t_min, self.cfg.critic_t_max, generator)
            target = L.subinterval_target(x_t, anchor, s, t, self.schedule, kind="x0")
        weight = L.denoising_weight(t, self.schedule, self.teacher.prediction)
        return L.critic_denoising_loss(self.critics[k](x_t, t, batch.cond), target, weight)


def build_phased_dmd(cfg: DictConfig, teacher: Teacher) -> PhasedDMD:
    """One expert ("phase<k>") and one critic per phase (algorithms.md §4.1): LoRA adapters on the frozen base, or
    full trainable copies (student.mode=full, method.critic_mode=full). Copies are taken from the clean base before
    any adapter is added to it."""
    method = OmegaConf.to_object(cfg.method)
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
