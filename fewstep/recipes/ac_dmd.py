"""AC-DMD, RTDMD's stage 1 ("ambient-consistent DMD", `recipe=rtdmd_cold`; algorithms.md §6.3). Roles: the student
(an M-step CPS sampler) and the fake score. Each iteration rolls the student out for a random number J of CPS
steps with the gradient on the last one, anchors the fake score's denoising on that step's output x_s at its
noise level s (the subinterval target of §4.2, weighted min(1, 10 b^2)) plus the two-sample ambient-consistency
regulariser, and every `critic_steps_per_student_step`-th iteration moves the student along the DMD direction
projected back to s by the same CPS step for teacher and fake. s = 0 (a full rollout) is plain DMD. The export
samples with CPS (`cps:eta=...`); `train.ema_decay` gives the generator EMA that seeds stage 2. `method.reward`
with `method.reward_weight` adds dmd2's reward backprop on the student's x0 at that last step (not in the official
stage 1, which trains on no reward)."""
from __future__ import annotations

from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import transition_coeffs
from fewstep.diffusion.schedule import Schedule
from fewstep.methods.rtdmd_cold import ACDMDConfig
from fewstep.models.adapters import WithAdapter
from fewstep.models.teacher import Teacher
from fewstep.recipes import dm
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.recipes.build import build_student_and_critic, dmd_student_times, inference_spec
from fewstep.recipes.reward import RewardLoss, build_reward_loss
from fewstep.sampling.draws import Draws, Generators, randn, uniform
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import make_step, parse_step, step_spec


class ACDMD(Recipe):
    """Student: CPS-projected DMD on the last executed rollout step. Fake score: subinterval denoising anchored at
    that step's output, plus the ambient-consistency regulariser."""

    Config: ClassVar[type] = ACDMDConfig
    name: ClassVar[str] = "rtdmd_cold"

    def __init__(self, *, student: nn.Module, student_net: nn.Module, student_params: dict[str, nn.Parameter],
                 real: nn.Module, critic: nn.Module, critic_params: dict[str, nn.Parameter], schedule: Schedule,
                 latent_shape: tuple[int, ...], config: ACDMDConfig, inference: InferenceSpec,
                 critic_space: str, reward: RewardLoss | None = None) -> None:
        self.cfg, self.spec, self.schedule, self.shape = config, inference, schedule, tuple(latent_shape)
        self.student_net, self.student, self.real, self.critic = student_net, student, real, critic
        self.critic_space, self.reward = critic_space, reward
        self._params = {"student": student_params, "critic": dict(critic_params)}
        self.times = torch.tensor(inference.times, dtype=torch.float64)   # ends at 0
        self.step = make_step(inference.step)                              # CPS with the run's eta

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "critic": self.critic}

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self._params[role]

    def inference(self) -> InferenceSpec:
        return self.spec

    def export_net(self) -> nn.Module:
        return self.student_net

    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        c, gen = self.cfg, draws.sample
        student_turn = step % c.critic_steps_per_student_step == 0
        x_s, x0, s, k = self.last_step(batch, draws, grad=student_turn)
        tau = self.renoise_times(len(x_s), s, gen, x_s.device)
        x_tau = L.subinterval_noise(x_s, s, tau, self.schedule, noise=randn(x_s.shape, gen))
        losses, metrics = {}, {"rollout_steps": float(k + 1)}
        if student_turn:
            losses["student"], metrics["dm_grad_norm"] = self.student_loss(x_s, s, x_tau, tau, batch, gen)
            if self.reward is not None:      # reward backprop through the VAE decode of that step's x0
                term, reward_metrics = self.reward.loss(x0, batch.prompts)
                losses["student"] = losses["student"] + term
                metrics.update(reward_metrics)
        losses["critic"], metrics["loss/consistency"] = self.critic_loss(x_s.detach(), s, x_tau, tau, batch, gen)
        return StepOutput(losses, metrics)

    def last_step(self, batch: Batch, draws: Draws, grad: bool) -> tuple[Tensor, Tensor, float, int]:
        """(x_s, x0, s, k): the output of the rollout's last executed CPS step (J ~ U{1..M} steps with random stop,
        one J for the global batch) and the student's x0 at that step, with the gradient through that step's student
        call only, its noise level, and the index k = J - 1 of that step."""
        dev, gen = next(iter(batch.cond.values())).device, draws.sample
        m = len(self.times) - 1
        k = draws.choice(0, m) if self.cfg.random_stop else m - 1          # index of the last executed step
        x = randn((len(batch.prompts), *self.shape), gen, dev)
        with torch.set_grad_enabled(grad):
            traj = rollout(self.student, x, self.times, self.schedule, cond=batch.cond, step=self.step,
                           generator=gen, until=k, grad="last")
            t, s = self.times[k], self.times[k + 1]
            x_s = self.step(traj.x, traj.x0, t.expand(len(x)), s.expand(len(x)), self.schedule, gen)
        return x_s, traj.x0, float(s), k

    def renoise_times(self, n: int, s: float, generator: Generators, device: torch.device) -> Tensor:
        """tau ~ U[s + offset, 1], clamped to [renoise_t_min, renoise_t_max] (float64, per sample)."""
        c = self.cfg
        tau = uniform(generator, n, min(s + c.renoise_offset, 1.0), 1.0, device).double()
        return tau.clamp(c.renoise_t_min, c.renoise_t_max)

    def student_loss(self, x_s: Tensor, s: float, x_tau: Tensor, tau: Tensor, batch: Batch,
                     generator: Generators) -> tuple[Tensor, float]:
        """Teacher (CFG) and fake x0 at (x_tau, tau), both projected to s by one CPS step with the same noise;
        g = (xs_F - xs_T) / mean|x_s - xs_T| (§6.3) and the §0.6 surrogate on x_s. The noise cancels:
        xs_T - xs_F = alpha_s (x0_T - x0_F) + sigma_s cos(theta) (eps_T - eps_F)."""
        c = self.cfg
        with torch.no_grad():
            x0_real = dm.guided_x0(self.real, x_tau, tau, batch.cond, batch.neg, c.real_guidance)
            x0_fake = self.critic(x_tau, tau, batch.cond)
            s_b = torch.full_like(tau, s)
            z = randn(x_s.shape, generator, x_s.device)
            project = lambda x0: self.step(x_tau, x0, tau, s_b, self.schedule, None, lambda *a: z)   # noqa: E731
            xs_real, xs_fake = project(x0_real), project(x0_fake)
            g = L.dmd_direction(x_s, xs_real, xs_fake, c.norm_min)
        return L.dmd_loss(x_s, g), float(g.flatten(1).norm(dim=1).mean())

    def critic_loss(self, x_s: Tensor, s: float, x_tau: Tensor, tau: Tensor, batch: Batch,
                    generator: Generators) -> tuple[Tensor, float]:
        """The fake score's subinterval denoising loss with x_s as data (§4.2), in `critic_space`, weighted
        min(1, cap b^2), plus gamma times the ambient-consistency regulariser (§6.3)."""
        c = self.cfg
        h_anchor = self.critic(x_tau, tau, batch.cond)
        target = L.subinterval_target(x_tau, x_s, s, tau, self.schedule, kind="x0")
        _, b = transition_coeffs(s, tau, self.schedule, x_tau)
        weight = L.denoising_weight(tau, self.schedule, self.critic_space) * L.capped_inverse_weight(
            b.flatten(1)[:, 0], c.critic_weight_cap)
        loss = L.critic_denoising_loss(h_anchor, target, weight)
        if c.consistency_weight <= 0:
            return loss, 0.0
        cons = self.consistency(x_tau, tau, h_anchor, batch, generator)
        return loss + c.consistency_weight * cons, float(cons.detach())

    def consistency(self, x_tau: Tensor, tau: Tensor, h_anchor: Tensor, batch: Batch,
                    generator: Generators) -> Tensor:
        """Two independent CPS transitions of sg(x_tau) with the fake's sg(x0) to tau' = max(tau - U[0.001, dt],
        0), the fake's x0 at each (with grad), and the two-sample estimator against the anchor."""
        dt = uniform(generator, len(tau), 1e-3, self.cfg.consistency_max_dt, tau.device).double()
        tau2 = (tau - dt).clamp_min(0.0)
        with torch.no_grad():
            pair = [self.step(x_tau, h_anchor.detach(), tau, tau2, self.schedule, generator) for _ in range(2)]
        h1, h2 = (self.critic(x, tau2, batch.cond) for x in pair)
        return L.ambient_consistency(h_anchor, h1, h2)


def build_ac_dmd(cfg: DictConfig, teacher: Teacher) -> ACDMD:
    """Student and fake score as in DMD2 (two LoRA adapters on one frozen base, or full copies); the student grid
    is DMD2's fixed M-step grid (the shifted [1000, 750, 500, 250] on flow teachers), sampled with CPS."""
    method = OmegaConf.to_object(cfg.method)
    sc = build_student_and_critic(cfg, teacher, method.critic_mode, method.critic_rank, method.critic_alpha)
    spec = inference_spec(cfg, teacher, step_spec("cps", eta=method.eta), dmd_student_times)
    assert parse_step(spec.step)[0] == "cps"
    return ACDMD(student=sc.student, student_net=sc.net, student_params=sc.student_params,
                 real=WithAdapter(teacher.denoiser(teacher.net), None), critic=sc.critic,
                 critic_params=sc.critic_params, schedule=teacher.schedule, latent_shape=teacher.latent_shape(),
                 config=method, inference=spec, critic_space="flow" if teacher.schedule.kind == "flow" else "eps",
                 reward=build_reward_loss(method.reward, method.reward_weight, method.reward_margin, teacher))
