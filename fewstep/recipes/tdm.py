"""TDM: Trajectory Distribution Matching (Luo et al., ICCV 2025, arXiv 2503.06674; algorithms.md §5).

Data-free (prompts only). The student is a deterministic M-step DDIM sampler using its own predicted noise; its
trajectory is regenerated every iteration with the current student (no grad). For each sampling step, the law of
the student's *next* trajectory state is matched to the teacher's marginal at noise levels inside that step's
interval ("sampling-steps-aware", `--use_separate`). The fake score learns the student's trajectory laws with a
mixed-noise importance weight; the generator loss is a pseudo-Huber distance to a DMD target with DMD
normalisation (effectively sign-DMD, §5.4). Update order 1 fake : 1 student, the student at lr / 5.

Bookkeeping is on the teacher's table of N entries (VP: diffusers timesteps 0..N-1; flow: sigma = index / N):
the trajectory visits t_g = K_T - 1 - m Delta for m = 0..M-1 (Delta = K_T // M), state m's interval starts at
t_mid = t_g - Delta + 1, and noise levels are drawn from {max(20, t_mid) .. t_g - 11} (§5.3, §5.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import transition, transition_coeffs
from fewstep.diffusion.param import eps_from_x0
from fewstep.diffusion.schedule import Schedule, bcast
from fewstep.methods.tdm import TDMConfig, step_width
from fewstep.models.adapters import WithAdapter
from fewstep.models.teacher import Teacher
from fewstep.recipes import dm
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.recipes.build import build_student_and_critic
from fewstep.sampling.draws import Draws, Generators, rand, randint, randn
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import ddim_step, ddim_transfer

IndexToTime = Callable[[Tensor], Tensor]


# -- bookkeeping (pure, integer table indices) ------------------------------------------------------------------

def trajectory_indices(total_steps: int, steps: int) -> list[int]:
    """The student's input times t^(m) = K_T - 1 - m Delta, m = 0..M-1 (algorithms.md §5.3; K_T = 900, M = 4:
    899, 674, 449, 224). State m is the official code's j = M - m, at t_g(j) = j K_T / M - 1 when M divides K_T."""
    width = step_width(total_steps, steps)
    return [total_steps - 1 - m * width for m in range(steps)]


def interval_start(t_g: Tensor | int, total_steps: int, steps: int) -> Tensor:
    """t_mid = t_g - Delta + 1: the lower end of the step that starts at t_g (0, 225, 450, 675 for K_T = 900)."""
    return torch.as_tensor(t_g) - step_width(total_steps, steps) + 1


def noise_index_bounds(t_g: Tensor, t_mid: Tensor, cfg: TDMConfig) -> tuple[Tensor, Tensor]:
    """Inclusive bounds of the noise level t ~ U{max(20, t_mid) .. upper - 1}, upper = t_g - 10 in separate mode
    (the step's own interval, so t < t_g always), K_T - 10 otherwise (§5.4 item 2)."""
    upper = t_g - cfg.high_margin if cfg.interval == "separate" else torch.full_like(t_g, cfg.total_steps - cfg.high_margin)
    return torch.clamp(t_mid, min=cfg.low_margin), upper - 1


def randint_between(lo: Tensor, hi: Tensor, generator: Generators) -> Tensor:
    """One integer per sample, uniform on {lo .. hi} (inclusive, per-sample bounds [B]), from one rand draw."""
    u = rand(generator, len(lo), torch.float64)
    return torch.minimum(lo + (u * (hi - lo + 1).double()).floor().long(), hi)


# -- the construction of §5.4 (pure) -----------------------------------------------------------------------------

@dataclass
class Noised:
    """One draw of §5.4 items 4-6 for a batch of trajectory states."""

    x_t: Tensor          # the student's next state, forward-diffused to t
    t: Tensor            # [B] noise level in [0, 1]
    mixed: Tensor        # m = ((alpha_t/alpha_mid) sigma_mid epshat + beta z) / sigma_t
    z: Tensor            # the fresh noise of the transition


def mixed_noise(x_in: Tensor, x0: Tensor, t_g: Tensor, t_mid: Tensor, t: Tensor, schedule: Schedule,
                z: Tensor) -> Noised:
    """DDIM from t_g to t_mid with the student's own noise (x_mid = alpha_mid x0hat + sigma_mid epshat), then the
    exact forward transition q(x_t | x_mid) with fresh z. The effective noise m satisfies x_t = alpha_t x0hat +
    sigma_t m exactly (§5.4 item 6; tested)."""
    a_g, s_g = (bcast(v, x0) for v in schedule.alpha_sigma(t_g))
    eps = eps_from_x0(x0, x_in, a_g, s_g)
    x_mid = ddim_transfer(x_in, x0, t_g, t_mid, schedule)
    x_t = transition(x_mid, t_mid, t, schedule, z)
    a, b = transition_coeffs(t_mid, t, schedule, x0)
    _, s_mid = (bcast(v.double(), x0.double()) for v in schedule.alpha_sigma(t_mid))
    _, s_t = (bcast(v.double(), x0.double()) for v in schedule.alpha_sigma(t))
    mixed = ((a * s_mid * eps.double() + b * z.to(x0.device).double()) / s_t).float()
    return Noised(x_t, t, mixed, z)


def importance_weight(mixed: Tensor, z: Tensor) -> Tensor:
    """w_IS = exp(-mean(m^2)/2) / exp(-mean(z^2)/2) per sample, means over all elements: the official code's
    strongly tempered density ratio of the effective noise against fresh noise (§5.4, §5.7). float64 [B]."""
    dims = tuple(range(1, mixed.ndim))
    return torch.exp(-0.5 * (mixed.double() ** 2).mean(dims) + 0.5 * (z.double().to(mixed.device) ** 2).mean(dims))


def fake_weight(t: Tensor, schedule: Schedule, clip: float) -> Tensor:
    """min(SNR_t, clip), SNR_t = alpha_t^2 / sigma_t^2 (§5.4)."""
    a, s = (v.double() for v in schedule.alpha_sigma(t))
    return (a**2 / s.clamp_min(1e-12) ** 2).clamp(max=clip)


def generator_loss(x0: Tensor, x0_cfg: Tensor, x0_fake: Tensor, kind: str, huber_c: float,
                   norm_min: float | None) -> Tensor:
    """L_G = mean(rho(x0hat - y) / nrm) with y = sg(x0hat + (x0_cfg - x0_F)) and nrm = sg(mean_CHW|x0hat - x0_cfg|)
    per sample (§5.4). rho(d) = d^2 gives dL/dx0hat = 2 (x0_F - x0_cfg) / (nrm numel), the DMD direction with
    DMD normalisation; the pseudo-Huber rho(d) = sqrt(d^2 + c^2) - c with c = 1e-3 makes it nearly
    sign(x0_F - x0_cfg) / (nrm numel): sign-DMD."""
    dims = tuple(range(1, x0.ndim))
    target = (x0.detach().double() + (x0_cfg.double() - x0_fake.double())).detach()
    nrm = (x0.detach().double() - x0_cfg.double()).abs().mean(dims, keepdim=True)
    nrm = nrm if norm_min is None else nrm.clamp_min(norm_min)
    d = x0.double() - target
    rho = d**2 if kind == "l2" else torch.sqrt(d**2 + huber_c**2) - huber_c
    return (rho / nrm).mean().float()


# -- the recipe ------------------------------------------------------------------------------------------------

class TDM(Recipe):
    """Roles: the student (deterministic few-step sampler) and the critic (the fake score, no CFG). `real` is the
    frozen teacher; `to_t` maps table indices to times in [0, 1]."""

    Config: ClassVar[type] = TDMConfig
    name: ClassVar[str] = "tdm"

    def __init__(self, *, student: nn.Module, student_net: nn.Module, student_params: dict[str, nn.Parameter],
                 real: nn.Module, critic: nn.Module, critic_params: dict[str, nn.Parameter], schedule: Schedule,
                 to_t: IndexToTime, latent_shape: tuple[int, ...], config: TDMConfig, steps: int,
                 student_lr: float) -> None:
        self.cfg, self.schedule, self.to_t, self.shape = config, schedule, to_t, tuple(latent_shape)
        self.student, self.student_net, self.real, self.critic = student, student_net, real, critic
        self._params = {"student": student_params, "critic": critic_params}
        self.student_lr = student_lr
        self.index = torch.tensor(trajectory_indices(config.total_steps, steps))
        self.times = torch.cat([to_t(self.index).double(), torch.zeros(1, dtype=torch.float64)])

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "critic": self.critic}

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self._params[role]

    def optimizer_settings(self, role: str) -> dict[str, float]:
        return {"lr": self.student_lr} if role == "student" else {}

    def inference(self) -> InferenceSpec:
        """On the trajectory times: deterministic DDIM, the training-consistent sampler, or DPM-Solver++(2M), the
        official README's DPMSolverMultistepScheduler (§5.6; `method.sampler`)."""
        return InferenceSpec(times=[float(t) for t in self.times], step=self.cfg.sampler)

    def export_net(self) -> nn.Module:
        return self.student_net

    def trajectory(self, batch: Batch, generator: Generators) -> tuple[Tensor, Tensor]:
        """(states [M, B, ...], x0 estimates [M, B, ...]) of the current student's DDIM rollout from pure noise
        (§5.3), without grad."""
        dev = next(iter(batch.cond.values())).device
        noise = randn((len(batch.prompts), *self.shape), generator, dev)
        xs, x0s = [], []

        def keep(i: int, t: Tensor, x: Tensor, x0: Tensor) -> None:
            xs.append(x)
            x0s.append(x0)

        rollout(self.student, noise, self.times, self.schedule, cond=batch.cond, step=ddim_step, grad="none",
                callback=keep)
        return torch.stack(xs), torch.stack(x0s)

    def draw(self, n: int, generator: Generators) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sample: a trajectory state m (the official j = M - m, j ~ U{1..M}), its time t_g, the interval's
        lower end t_mid (drawn in [t_mid, t_g - 20) with random_mid) and the noise level t (§5.4 items 1-2);
        table indices, drawn in that order."""
        c = self.cfg
        m = randint(generator, len(self.index), n)
        t_g = self.index[m]
        t_mid = interval_start(t_g, c.total_steps, len(self.index))
        if c.random_mid:
            t_mid = randint_between(t_mid, t_g - c.low_margin - 1, generator)
        return m, t_g, t_mid, randint_between(*noise_index_bounds(t_g, t_mid, c), generator)

    def noised(self, x_in: Tensor, x0: Tensor, t_g: Tensor, t_mid: Tensor, t: Tensor,
               generator: Generators) -> Noised:
        tg, tm, tt = (self.to_t(v).to(x0.device) for v in (t_g, t_mid, t))
        return mixed_noise(x_in, x0.detach(), tg, tm, tt, self.schedule, randn(x0.shape, generator, x0.device))

    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        generator = draws.sample
        with torch.no_grad():
            states, x0s = self.trajectory(batch, generator)
        critic, metrics = self.critic_loss(states, x0s, batch, generator)
        student = self.student_loss(states, batch, generator)
        return StepOutput({"student": student, "critic": critic}, metrics)

    def critic_loss(self, states: Tensor, x0s: Tensor, batch: Batch,
                    generator: Generators) -> tuple[Tensor, dict[str, float]]:
        """The fake score regresses the student's x0hat (not x_mid) at x_t, weighted min(SNR_t, 5) w_IS (§5.4)."""
        m, t_g, t_mid, t = self.draw(len(states[0]), generator)
        rows = torch.arange(len(m))
        x0 = x0s[m, rows]
        d = self.noised(states[m, rows], x0, t_g, t_mid, t, generator)
        weight = fake_weight(d.t, self.schedule, self.cfg.snr_clip)
        w_is = importance_weight(d.mixed, d.z) if self.cfg.importance_weight else torch.ones_like(weight)
        loss = L.critic_denoising_loss(self.critic(d.x_t, d.t, batch.cond), x0, (weight * w_is).float())
        return loss, {"w_is_mean": float(w_is.mean())}

    def student_loss(self, states: Tensor, batch: Batch, generator: Generators) -> Tensor:
        """The generator target y = sg(x0hat + x0_cfg - x0_F) at the same construction, drawn afresh; the gradient
        reaches the student only through x0hat (teacher and fake run without grad, x_t is built from sg(x0hat))."""
        m, t_g, t_mid, t = self.draw(len(states[0]), generator)
        x_in = states[m, torch.arange(len(m))]
        tg = self.to_t(t_g).to(x_in.device)
        x0 = self.student(x_in, tg, batch.cond)
        with torch.no_grad():
            d = self.noised(x_in, x0, t_g, t_mid, t, generator)
            x0_cfg = dm.guided_x0(self.real, d.x_t, d.t, batch.cond, batch.neg, self.cfg.real_guidance)
            x0_fake = self.critic(d.x_t, d.t, batch.cond)
        return generator_loss(x0, x0_cfg, x0_fake, self.cfg.loss, self.cfg.huber_c, self.cfg.norm_min)


def table_times(schedule: Schedule) -> IndexToTime:
    """Table index -> t in [0, 1]: the DDPM table's own map (index / (N - 1)); on flow teachers sigma = index / 1000
    (the 1000-entry table of FlowMatchEulerDiscreteScheduler, unshifted)."""
    to_t = getattr(schedule, "to_t", None)
    return to_t if to_t is not None else (lambda index: torch.as_tensor(index, dtype=torch.float64) / 1000)


def build_tdm(cfg: DictConfig, teacher: Teacher) -> TDM:
    """Student (LoRA on the frozen base, or a full copy) and fake score (LoRA adapter "critic" or full copy, copied
    from the clean base before any adapter is added), both initialised from the teacher (§5.2)."""
    from fewstep.errors import FewstepError

    method = OmegaConf.to_object(cfg.method)
    table = getattr(teacher.schedule, "num_train_timesteps", 1000)
    if method.total_steps > table:
        raise FewstepError(f"method.total_steps={method.total_steps} exceeds the teacher's {table}-entry table")
    if method.sampler == "dpmsolver" and teacher.schedule.kind != "vp":
        raise FewstepError("method.sampler=dpmsolver is for DDPM-table teachers (SD1.5, SDXL, PixArt); flow teachers "
                           "(SD3, FLUX) sample TDM with method.sampler=ddim")
    sc = build_student_and_critic(cfg, teacher, method.critic_mode, method.critic_rank, method.critic_alpha)
    return TDM(student=sc.student, student_net=sc.net, student_params=sc.student_params,
               real=WithAdapter(teacher.denoiser(teacher.net), None), critic=sc.critic,
               critic_params=sc.critic_params,
               schedule=teacher.schedule, to_t=table_times(teacher.schedule), latent_shape=teacher.latent_shape(),
               config=method, steps=cfg.sample.steps, student_lr=cfg.train.lr * method.student_lr_scale)
