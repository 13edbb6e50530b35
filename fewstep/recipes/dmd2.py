"""DMD2: improved distribution matching distillation (Yin et al. 2024, Alg. 1; algorithms.md §3), with the
decoupled-guidance option of §7.1 and DMD (v1)'s regression term. Roles: the student (few-step generator) and the
critic (fake score + optional GAN head), updated on two time scales. The recipe sees denoisers, a schedule and
encoded conditions; its builder (`build_dmd2`) does everything that needs the pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import Schedule
from fewstep.errors import FewstepError
from fewstep.methods.dmd2 import DMD2Config
from fewstep.models.adapters import WithAdapter
from fewstep.models.teacher import Teacher
from fewstep.pairs import load_pairs
from fewstep.recipes import dm
from fewstep.recipes import losses as L
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.recipes.build import build_student_and_critic, dmd_student_times, inference_spec
from fewstep.recipes.critic import FeatureTap, GanHead, feature_module, make_head
from fewstep.recipes.reward import RewardLoss, build_reward_loss
from fewstep.sampling.draws import Draws, Generators, randint, randn
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import renoise_step

# (n, generator, device) -> (teacher noise, teacher sample, encoded conditions) for DMD's regression term
PairsDraw = Callable[[int, Generators, torch.device], tuple[Tensor, Tensor, dict[str, Tensor]]]


@dataclass
class GanParts:
    """The diffusion-GAN classifier: a forward hook on one critic feature map and the head that reads it."""

    tap: FeatureTap
    head: GanHead


class DMD2(Recipe):
    """Student: DM gradient from teacher vs critic (+ GAN, + regression). Critic: denoising on the student's samples
    (+ GAN discriminator on real vs student). The student steps once every `critic_steps_per_student_step`
    iterations. `critic_space` is the parameterisation of the critic's denoising loss (the builder resolves
    "teacher" to the teacher's own prediction type)."""

    Config: ClassVar[type] = DMD2Config
    name: ClassVar[str] = "dmd2"

    def __init__(self, *, student: nn.Module, student_net: nn.Module, student_params: dict[str, nn.Parameter],
                 real: nn.Module, critic: nn.Module, critic_params: dict[str, nn.Parameter], schedule: Schedule,
                 latent_shape: tuple[int, ...], config: DMD2Config, inference: InferenceSpec, critic_space: str,
                 gan: GanParts | None = None, pairs: PairsDraw | None = None,
                 reward: RewardLoss | None = None) -> None:
        self.cfg, self.spec, self.schedule, self.shape = config, inference, schedule, tuple(latent_shape)
        self.student_net, self.student = student_net, student
        self.real, self.critic, self.critic_space = real, critic, critic_space
        self._params = {"student": student_params, "critic": dict(critic_params)}
        self.times = torch.tensor(inference.times[:-1], dtype=torch.float64)
        self.gan, self.pairs, self.reward = gan, pairs, reward
        if gan is not None:
            self._params["critic"].update({f"gan_head.{n}": p for n, p in gan.head.named_parameters()})

    # -- roles ---------------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        critic = self.critic if self.gan is None else nn.ModuleList([self.critic, self.gan.head])
        return {"student": self.student_net, "critic": critic}

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self._params[role]

    def optimizer_settings(self, role: str) -> dict[str, float]:
        return {"lr": self.cfg.critic_lr} if role == "critic" and self.cfg.critic_lr > 0 else {}

    def inference(self) -> InferenceSpec:
        return self.spec

    def export_net(self) -> nn.Module:
        return self.student_net

    # -- the algorithm -------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        student_turn = step % self.cfg.critic_steps_per_student_step == 0          # §3.5: i % N == 0
        x_gen = self.generate(batch, draws, grad=student_turn)
        losses, metrics = {}, {}
        if student_turn:
            losses["student"], metrics = self.student_loss(x_gen, batch, draws.sample)
        losses["critic"] = self.critic_loss(x_gen.detach(), batch, draws.sample)
        return StepOutput(losses, metrics)

    def generate(self, batch: Batch, draws: Draws, grad: bool) -> Tensor:
        """The student's sample for this iteration. With backward simulation, the input at the drawn step k is
        made by running the current student for k steps from fresh noise (no grad); otherwise real latents are
        noised to tau_k. k = 0 (and t = 999) is pure noise (§3.3), one k for the whole global batch. Gradient flows
        through the last call only."""
        dev, generator = next(iter(batch.cond.values())).device, draws.sample
        k = draws.choice(0, len(self.times))
        x = randn((len(batch.prompts), *self.shape), generator, dev)
        if k > 0 and not self.cfg.backward_simulation:
            with torch.no_grad():
                x = self._noised_real(batch, k, generator)
            with torch.set_grad_enabled(grad):
                return self.student(x, self.times[k].to(dev).expand(len(x)), batch.cond)
        with torch.set_grad_enabled(grad):   # the student's own re-noising sampler up to step k (§3.3)
            return rollout(self.student, x, self.times, self.schedule, cond=batch.cond, step=renoise_step,
                           generator=generator, until=k, grad="last").x0

    def _noised_real(self, batch: Batch, k: int, generator: Generators) -> Tensor:
        if batch.x0.numel() == 0:
            raise FewstepError("method.backward_simulation=false needs real images (data.source=digits or folder)")
        return diffuse(batch.x0, self.times[k].expand(len(batch.x0)), self.schedule,
                       randn(batch.x0.shape, generator, batch.x0.device))

    def direction(self, x: Tensor, batch: Batch, generator: Generators) -> Tensor:
        """The DMD gradient g (§0.6), or the sum of the decoupled CA and DM terms on separate draws (§7.1)."""
        c = self.cfg
        if not c.decoupled:
            return c.dm_weight * dm.dm_direction(x, self.real, self.critic, self.schedule, batch.cond, batch.neg,
                                                 guidance=c.real_guidance, t_range=dm.as_range(c, "dm"),
                                                 norm_min=c.norm_min, generator=generator)
        return dm.decoupled_direction(x, self.real, self.critic, self.schedule, batch.cond, batch.neg,
                                      guidance=c.real_guidance, ca=(c.ca_weight, *dm.as_range(c, "ca")),
                                      dm=(c.dm_weight, *dm.as_range(c, "dm")), norm_min=c.norm_min,
                                      generator=generator)

    def student_loss(self, x_gen: Tensor, batch: Batch, generator: Generators) -> tuple[Tensor, dict]:
        g = self.direction(x_gen.detach(), batch, generator)
        loss = L.dmd_loss(x_gen, g)
        metrics = {"dm_grad_norm": float(g.flatten(1).norm(dim=1).mean())}   # per-sample norm, batch mean
        if self.pairs is not None:
            reg = self.regression(len(x_gen), generator, x_gen.device)
            loss = loss + self.cfg.regression_weight * reg
            metrics["loss/regression"] = float(reg.detach())
        if self.gan is not None and self.cfg.gan_generator_weight > 0:
            adv = L.through(lambda x: L.gan_generator_loss(self._critic_logits(x, batch.cond, generator)), x_gen)
            loss = loss + self.cfg.gan_generator_weight * adv
            metrics["loss/gan_generator"] = float(adv.detach())
        if self.reward is not None:                  # reward backprop through the VAE decode of the student's x0
            term, reward_metrics = self.reward.loss(x_gen, batch.prompts)
            loss = loss + term
            metrics.update(reward_metrics)
        return loss, metrics

    def regression(self, n: int, generator: Generators, device: torch.device) -> Tensor:
        """DMD's regression term (Yin et al. 2024, Eq. 9): the one-step student from stored teacher noise must land
        on the teacher's deterministic sample; in latent space here (L2 or pseudo-Huber)."""
        assert self.pairs is not None
        noise, target, cond = self.pairs(n, generator, device)
        pred = self.student(noise, self.times[0].to(device).expand(n), cond)
        return L.regression_loss(pred, target, self.cfg.regression_loss)

    def critic_loss(self, x: Tensor, batch: Batch, generator: Generators) -> Tensor:
        """Fake-score denoising on sg(student samples), in `critic_space` (eps-MSE for SD, as DMD2; flow-matching
        for flow teachers), plus the GAN discriminator loss."""
        c = self.cfg
        loss = dm.fake_score_loss(self.critic, x, batch.cond, self.schedule, t_range=dm.as_range(c, "critic"),
                                  space=self.critic_space, generator=generator)
        if self.gan is not None and c.gan_critic_weight > 0:
            if batch.x0.numel() == 0:
                raise FewstepError("the GAN term needs real images: use data.source=digits or folder, or set "
                                   "method.gan_generator_weight=0 method.gan_critic_weight=0")
            real = self._critic_logits(batch.x0, batch.cond, generator)
            fake = self._critic_logits(x, batch.cond, generator)
            loss = loss + c.gan_critic_weight * L.gan_discriminator_loss(real, fake)
        return loss

    def _critic_logits(self, x0: Tensor, cond: dict[str, Tensor], generator: Generators) -> Tensor:
        """Diffusion-GAN classifier: noise x0 to t ~ U[0, gan_t_max], run the critic, classify its features."""
        assert self.gan is not None
        x_t, t = dm.noise_at(self.schedule, x0, 0.0, self.cfg.gan_t_max, generator)
        self.critic(x_t, t, cond)
        return self.gan.head(self.gan.tap.value)


def gan_parts(critic: nn.Module, critic_net: nn.Module, teacher: Teacher, width: int) -> GanParts:
    """Size the GAN head from one critic feature map of a dummy input (its size depends on the family and
    resolution)."""
    tap = FeatureTap(feature_module(critic_net))
    device = next(critic_net.parameters()).device
    with torch.no_grad():
        critic(torch.zeros(1, *teacher.latent_shape(), device=device), torch.full((1,), 0.5, device=device),
               teacher.null_cond(1))
    return GanParts(tap, make_head(tap, width, device))


def pairs_draw(path: str, teacher: Teacher) -> PairsDraw:
    """Draws from the `fewstep pairs` cache: indices from the recipe's generator, prompts encoded on the way."""
    noise, target, prompts = load_pairs(path)

    def draw(n: int, generator: Generators, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        idx = randint(generator, len(noise), n)
        cond = teacher.encode_prompts([prompts[i] for i in idx])
        return noise[idx].to(device), target[idx].to(device), {k: v.to(device) for k, v in cond.items()}

    return draw


def build_dmd2(cfg: DictConfig, teacher: Teacher) -> DMD2:
    """Student and critic on one frozen base where both are LoRA adapters ("default" and "critic"); a full
    critic is copied from the clean base before any adapter is added."""
    method = OmegaConf.to_object(cfg.method)
    sc = build_student_and_critic(cfg, teacher, method.critic_mode, method.critic_rank, method.critic_alpha)
    use_gan = method.gan_generator_weight > 0 or method.gan_critic_weight > 0
    space = teacher.prediction if method.critic_weighting == "teacher" else method.critic_weighting
    return DMD2(student=sc.student, student_net=sc.net, student_params=sc.student_params,
                real=WithAdapter(teacher.denoiser(teacher.net), None), critic=sc.critic, critic_params=sc.critic_params,
                schedule=teacher.schedule, latent_shape=teacher.latent_shape(), config=method,
                inference=inference_spec(cfg, teacher, "consistency", dmd_student_times), critic_space=space,
                gan=gan_parts(sc.critic, sc.critic_net, teacher, method.gan_head_width) if use_gan else None,
                pairs=pairs_draw(method.pairs_path, teacher) if method.regression_weight > 0 else None,
                reward=build_reward_loss(method.reward, method.reward_weight, method.reward_margin, teacher))
