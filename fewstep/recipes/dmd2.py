"""DMD2: improved distribution matching distillation (Yin et al. 2024, Alg. 1; algorithms.md §3), with the
decoupled-guidance option of §7.1. Roles: the student (few-step generator) and the critic (fake score + optional
GAN head), updated on two time scales."""
from __future__ import annotations

from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import Schedule
from fewstep.errors import FewstepError
from fewstep.methods import DMD2Config
from fewstep.models.adapters import WithAdapter
from fewstep.models.denoiser import concat_cond
from fewstep.models.teacher import Teacher
from fewstep.pairs import load_pairs
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput, uniform
from fewstep.recipes.build import build_student, inference_spec
from fewstep.recipes.critic import FeatureTap, GanHead, feature_module, frozen, make_head
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import renoise_step



def dmd_student_times(teacher: Teacher, steps: int) -> Tensor:
    """DMD2's fixed student grid: range(T - 1, 0, -T // K) on DDPM tables (999, 749, 499, 249 for K = 4); the
    teacher's own (shifted) K-step grid for flow teachers. Ends at 0."""
    sched = teacher.schedule
    if sched.kind == "vp":
        n = sched.num_train_timesteps
        idx = torch.arange(n - 1, 0, -(n // steps), dtype=torch.float64)[:steps]
        return torch.cat([idx / (n - 1), torch.zeros(1, dtype=torch.float64)])
    return teacher.teacher_times(steps)


def noise_at(schedule: Schedule, x: Tensor, lo: float, hi: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(alpha_t x + sigma_t n, t) with t ~ U[lo, hi] per sample and fresh noise n."""
    t = uniform(generator, len(x), lo, hi, x.device)
    return diffuse(x, t, schedule, torch.randn(x.shape, generator=generator)), t


def teacher_cond_uncond(real: nn.Module, x_t: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """The teacher's conditional and unconditional x0 in one batched forward."""
    both = real(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(batch.cond, batch.neg))
    cond, uncond = both.chunk(2)
    return cond, uncond


class DMD2(Recipe):
    """Student: DM gradient from teacher vs critic (+ GAN). Critic: denoising on the student's samples (+ GAN
    discriminator on real vs student). The student steps once every `critic_steps_per_student_step` iterations."""

    Config: ClassVar[type] = DMD2Config
    name: ClassVar[str] = "dmd2"

    def __init__(self, teacher: Teacher, student: nn.Module, student_params: dict[str, nn.Parameter],
                 real: nn.Module, critic: nn.Module, critic_params: dict[str, nn.Parameter], config: DMD2Config,
                 inference: InferenceSpec, student_denoiser: nn.Module) -> None:
        self.cfg, self.teacher, self.spec = config, teacher, inference
        self.schedule = teacher.schedule
        self.student_net, self.student = student, student_denoiser
        self.real, self.critic = real, critic
        self._params = {"student": student_params, "critic": dict(critic_params)}
        self.times = torch.tensor(inference.times[:-1], dtype=torch.float64)
        self.head: GanHead | None = None
        self.tap: FeatureTap | None = None
        self.pairs = load_pairs(config.pairs_path) if config.regression_weight > 0 else None
        if config.gan_generator_weight > 0 or config.gan_critic_weight > 0:
            self.attach_gan_head()

    # -- roles ---------------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "critic": self.critic}

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self._params[role]

    def optimizer_settings(self, role: str) -> dict[str, float]:
        return {"lr": self.cfg.critic_lr} if role == "critic" and self.cfg.critic_lr > 0 else {}

    def inference(self) -> InferenceSpec:
        return self.spec

    def attach_gan_head(self) -> None:
        """Build the classifier head from one critic feature map of a dummy input (its size depends on the
        family and resolution); its parameters join the critic's optimizer and checkpoint."""
        self.tap = FeatureTap(feature_module(self.critic.net))
        device = next(self.critic.net.parameters()).device
        x = torch.zeros(1, *self.teacher.latent_shape(), device=device)
        with torch.no_grad():
            self.critic(x, torch.full((1,), 0.5, device=device), self.teacher.null_cond(1))
        self.head = make_head(self.tap, self.cfg.gan_head_width, device)
        self._params["critic"].update({f"gan_head.{n}": p for n, p in self.head.named_parameters()})

    # -- the algorithm -------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int, generator: torch.Generator) -> StepOutput:
        student_turn = step % self.cfg.critic_steps_per_student_step == 0          # §3.5: i % N == 0
        x_gen = self.generate(batch, generator, grad=student_turn)
        losses, metrics = {}, {}
        if student_turn:
            losses["student"], metrics = self.student_loss(x_gen, batch, generator)
        losses["critic"] = self.critic_loss(x_gen.detach(), batch, generator)
        return StepOutput(losses, metrics)

    def generate(self, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """The student's sample for this iteration. With backward simulation, the input at the drawn step k is
        made by running the current student for k steps from fresh noise (no grad); otherwise real latents are
        noised to tau_k. k = 0 (and t = 999) is pure noise (§3.3). Gradient flows through the last call only."""
        shape = (len(batch.prompts), *self.teacher.latent_shape())
        dev = next(iter(batch.cond.values())).device
        k = int(torch.randint(0, len(self.times), (1,), generator=generator))
        x = torch.randn(shape, generator=generator).to(dev)
        if k > 0 and not self.cfg.backward_simulation:
            with torch.no_grad():
                x = self._noised_real(batch, k, generator)
            with torch.set_grad_enabled(grad):
                return self.student(x, self.times[k].to(dev).expand(len(x)), batch.cond)
        with torch.set_grad_enabled(grad):   # the student's own re-noising sampler up to step k (§3.3)
            return rollout(self.student, x, self.times, self.schedule, cond=batch.cond, step=renoise_step,
                           generator=generator, until=k, grad="last").x0

    def _noised_real(self, batch: Batch, k: int, generator: torch.Generator) -> Tensor:
        if batch.x0.numel() == 0:
            raise FewstepError("method.backward_simulation=false needs real images (data.source=digits or folder)")
        return diffuse(batch.x0, self.times[k].expand(len(batch.x0)), self.schedule,
                       torch.randn(batch.x0.shape, generator=generator))

    def _noise(self, x: Tensor, lo: float, hi: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return noise_at(self.schedule, x, lo, hi, generator)

    def _teacher_cond_uncond(self, x_t: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        return teacher_cond_uncond(self.real, x_t, t, batch)

    def direction(self, x: Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        """The DMD gradient g (§0.6), or the sum of the decoupled CA and DM terms on separate draws (§7.1)."""
        c, w = self.cfg, self.cfg.real_guidance
        if not c.decoupled:
            x_t, t = self._noise(x, c.dm_t_min, c.dm_t_max, generator)
            xc, xu = self._teacher_cond_uncond(x_t, t, batch)
            return c.dm_weight * L.dmd_direction(x, xu + w * (xc - xu), self.critic(x_t, t, batch.cond), c.norm_min)
        g = torch.zeros_like(x)
        if c.ca_weight > 0:
            x_t, t = self._noise(x, c.ca_t_min, c.ca_t_max, generator)
            xc, xu = self._teacher_cond_uncond(x_t, t, batch)
            g = g + L.decoupled_dmd_direction(x, xc, xu, xc, w, w_cfg=c.ca_weight, w_dm=0.0, eps_norm_min=c.norm_min)
        if c.dm_weight > 0:
            x_t, t = self._noise(x, c.dm_t_min, c.dm_t_max, generator)
            xc, xu = self._teacher_cond_uncond(x_t, t, batch)
            g = g + L.decoupled_dmd_direction(x, xc, xu, self.critic(x_t, t, batch.cond), w, w_cfg=0.0,
                                              w_dm=c.dm_weight, eps_norm_min=c.norm_min)
        return g

    def student_loss(self, x_gen: Tensor, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict]:
        with torch.no_grad():
            g = self.direction(x_gen.detach(), batch, generator)
        loss = L.dmd_loss(x_gen, g)
        metrics = {"dm_grad_norm": float(g.norm() / max(len(g), 1))}
        if self.pairs is not None:
            reg = self.regression(len(x_gen), generator, x_gen.device)
            loss = loss + self.cfg.regression_weight * reg
            metrics["loss/regression"] = float(reg.detach())
        if self.head is not None and self.cfg.gan_generator_weight > 0:
            with frozen(list(self._params["critic"].values())):        # gradient through, not into, the critic
                adv = L.gan_generator_loss(self._critic_logits_input(x_gen, batch.cond, generator))
            loss = loss + self.cfg.gan_generator_weight * adv
            metrics["loss/gan_generator"] = float(adv.detach())
        return loss, metrics

    def regression(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """DMD's regression term (Yin et al. 2024, Eq. 9): the one-step student from stored teacher noise must land
        on the teacher's deterministic sample; in latent space here (L2 or pseudo-Huber)."""
        noise, target, prompts = self.pairs
        idx = torch.randint(0, len(noise), (n,), generator=generator)
        cond = self.teacher.encode_prompts([prompts[i] for i in idx])
        t0 = self.times[0].to(device).expand(n)
        pred = self.student(noise[idx].to(device), t0, {k: v.to(device) for k, v in cond.items()})
        return L.regression_loss(pred, target[idx].to(device), self.cfg.regression_loss)

    def critic_loss(self, x: Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        """Fake-score denoising on sg(student samples), in the teacher's own parameterisation (eps-MSE for SD,
        as DMD2; flow-matching for flow teachers), plus the GAN discriminator loss."""
        x_t, t = self._noise(x, self.cfg.critic_t_min, self.cfg.critic_t_max, generator)
        space = self.teacher.prediction if self.cfg.critic_weighting == "teacher" else self.cfg.critic_weighting
        weight = L.denoising_weight(t, self.schedule, space)
        loss = L.critic_denoising_loss(self.critic(x_t, t, batch.cond), x, weight)
        if self.head is not None and self.cfg.gan_critic_weight > 0:
            if batch.x0.numel() == 0:
                raise FewstepError("the GAN term needs real images: use data.source=digits or folder, or set "
                                   "method.gan_generator_weight=0 method.gan_critic_weight=0")
            real = self._critic_logits_input(batch.x0, batch.cond, generator)
            fake = self._critic_logits_input(x, batch.cond, generator)
            loss = loss + self.cfg.gan_critic_weight * L.gan_discriminator_loss(real, fake)
        return loss

    def _critic_logits_input(self, x0: Tensor, cond: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """Diffusion-GAN classifier: noise x0 to t ~ U[0, gan_t_max], run the critic, classify its features."""
        x_t, t = self._noise(x0, 0.0, self.cfg.gan_t_max, generator)
        self.critic(x_t, t, cond)
        if self.head is None:
            return torch.zeros(len(x0), device=x0.device)
        return self.head(self.tap.value)

    def export_net(self) -> nn.Module:
        return self.student_net


def build_dmd2(cfg: DictConfig, teacher: Teacher) -> DMD2:
    """Student and critic on one frozen base where both are LoRA adapters ("default" and "critic"); a full
    critic is copied from the clean base before any adapter is added."""
    method = OmegaConf.to_object(cfg.method)
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
