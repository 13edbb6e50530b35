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
from fewstep.diffusion.schedule import Schedule
from fewstep.methods.phased_dmd import PhasedDMDConfig
from fewstep.models.adapters import WithAdapter, enable_checkpointing
from fewstep.models.student import full_copy
from fewstep.models.teacher import Teacher
from fewstep.recipes import dm
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.sampling.draws import Draws, Generators, randn, uniform
from fewstep.recipes.build import dmd_student_times, inference_spec
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import renoise_step



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
    """`net` holds the experts (high noise first): the shared frozen base carrying one LoRA adapter per expert, or
    an nn.ModuleDict of full networks keyed by expert name; it is what the export writes. `student` is the
    inference object that picks the expert of each time (`ExpertSwitch`), the same one sampling uses."""

    Config: ClassVar[type] = PhasedDMDConfig
    name: ClassVar[str] = "phased_dmd"

    def __init__(self, *, student: nn.Module, net: nn.Module, expert_params: dict[str, nn.Parameter],
                 critics: list[nn.Module], critic_params: dict[str, nn.Parameter], real: nn.Module,
                 schedule: Schedule, latent_shape: tuple[int, ...], config: PhasedDMDConfig,
                 inference: InferenceSpec, critic_space: str, total_steps: int) -> None:
        self.cfg, self.spec, self.net, self.student = config, inference, net, student
        self.schedule, self.shape, self.critics, self.real = schedule, tuple(latent_shape), critics, real
        self.critic_space = critic_space
        self._params = {"student": expert_params, "critic": critic_params}
        self.times = torch.tensor(inference.times, dtype=torch.float64)
        self.bounds = phase_bounds(config.phase_steps, inference.times)
        self.total_steps = total_steps

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

    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        k = self.phase(step)
        losses: dict[str, Tensor] = {}
        if step % self.cfg.critic_steps_per_student_step == 0:
            losses["student"] = self.student_loss(batch, k, draws)
        losses["critic"] = self.critic_loss(batch, k, draws.sample)
        return StepOutput(losses, {"phase": float(k)})

    def _student_output(self, batch: Batch, j: int, generator: Generators, grad: bool) -> Tensor:
        """The student's x0 at step j of its re-noising sampler from fresh noise (steps before j without grad)."""
        dev = next(iter(batch.cond.values())).device
        x = randn((len(batch.prompts), *self.shape), generator, dev)
        with torch.set_grad_enabled(grad):
            return rollout(self.student, x, self.times, self.schedule, cond=batch.cond, step=renoise_step,
                           generator=generator, until=j, grad="last").x0

    def _anchor(self, x0: Tensor, s: float, generator: Generators) -> Tensor:
        """The phase output at its boundary s: x0 re-noised to s (x0 itself at s = 0)."""
        if s == 0:
            return x0
        return diffuse(x0, torch.full((len(x0),), s, dtype=torch.float64), self.schedule,
                       randn(x0.shape, generator, x0.device))

    def _diffuse(self, anchor: Tensor, s: float, lo: float, hi: float, generator: Generators) -> tuple[Tensor, Tensor]:
        """t ~ U[max(lo, s + margin), hi] and x_t from the subinterval kernel q(x_t | x_s) (§4.2)."""
        t = uniform(generator, len(anchor), max(lo, s + self.cfg.margin) if s > 0 else lo, hi, anchor.device)
        noise = randn(anchor.shape, generator, anchor.device)
        return L.subinterval_noise(anchor, s, t, self.schedule, noise=noise), t

    def student_loss(self, batch: Batch, k: int, draws: Draws) -> Tensor:
        """Draw a step j of phase k, roll out to it, predict x0 with grad, jump to the boundary s_k (the anchor)
        and apply the DMD gradient of the anchor's law to x0_j (the anchor is affine in x0_j, §4.3 item 7). One j
        for the whole global batch."""
        start, end, s = self.bounds[k]
        j, generator = draws.choice(start, end), draws.sample
        x0 = self._student_output(batch, j, generator, grad=True)
        with torch.no_grad():
            anchor = self._anchor(x0.detach(), s, generator)
            x_t, t = self._diffuse(anchor, s, self.cfg.dm_t_min, self.cfg.dm_t_max, generator)
            x0_real = dm.guided_x0(self.real, x_t, t, batch.cond, batch.neg, self.cfg.real_guidance)
            g = L.dmd_direction(x0, x0_real, self.critics[k](x_t, t, batch.cond), self.cfg.norm_min)
        return L.dmd_loss(x0, g)

    def critic_loss(self, batch: Batch, k: int, generator: Generators) -> Tensor:
        """Critic k learns the score of phase k's output law at t > s_k from the noisy anchor (§4.2 target)."""
        _, end, s = self.bounds[k]
        with torch.no_grad():
            anchor = self._anchor(self._student_output(batch, end - 1, generator, grad=False), s, generator)
            x_t, t = self._diffuse(anchor, s, self.cfg.critic_t_min, self.cfg.critic_t_max, generator)
            target = L.subinterval_target(x_t, anchor, s, t, self.schedule, kind="x0")
        weight = L.denoising_weight(t, self.schedule, self.critic_space)
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
    return PhasedDMD(student=spec.wrap(teacher.denoiser(net)), net=net,
                     expert_params=expert_params, critics=critics[0], critic_params=critics[1],
                     real=WithAdapter(teacher.denoiser(teacher.net), None), schedule=teacher.schedule,
                     latent_shape=teacher.latent_shape(), config=method, inference=spec,
                     critic_space=teacher.prediction, total_steps=cfg.train.steps)


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
            enable_checkpointing(m)
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
