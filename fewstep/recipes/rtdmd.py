"""RTDMD stage 2, the hybrid policy gradient (`recipe=rtdmd`; algorithms.md §6.4). Each iteration rolls the
student out on groups of K images per prompt with CPS (no grad): the SubGRPO steps drawn for the iteration take
per-sample noise, every other stochastic step the prompt group's shared noise, so reward differences inside a
group come from the trained steps. Rewards of the decoded samples give per-prompt advantages with the global std.
The student then takes the clipped PPO surrogate on the trained steps' CPS log-probabilities (one update per
rollout, so the ratio starts at 1) and, on the deterministic last step, the AC-DMD auxiliary term (s = 0) plus the
reward-backprop hinge; the fake score trains on the rollout's final samples with the AC objective. The AC-DMD
pieces are `fewstep.recipes.ac_dmd.ACDMD`'s, held by composition.

`method.kl_weight` > 0 (not in the official code) adds beta_KL E_j[KL(pi_theta(.|x_j) || pi_ref(.|x_j))] on the
trained steps, pi_ref being the frozen stage-1 network's CPS step: the KL-regularised objective E[A] - beta_KL KL,
whose optimum over whole rollouts is the stage-1 rollout tilted by exp(A / beta_KL). Without it nothing but the
step size keeps the stochastic steps near stage 1, since the AC-DMD term acts on the last step only."""
from __future__ import annotations

from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.methods.rtdmd import RTDMDConfig
from fewstep.methods.rtdmd_cold import ACDMDConfig
from fewstep.models.adapters import WithAdapter
from fewstep.models.teacher import Teacher, load_teacher
from fewstep.recipes.ac_dmd import ACDMD
from fewstep.recipes.base import Batch, InferenceSpec, Recipe, StepOutput
from fewstep.recipes.build import build_student_and_critic, dmd_student_times, inference_spec
from fewstep.recipes.losses import subinterval_noise
from fewstep.recipes.grpo import group_leaders, local_advantages, ppo_terms, select_steps, shared_noise
from fewstep.recipes.reward import RewardLoss, build_reward_loss
from fewstep.sampling.draws import Draws, randn
from fewstep.sampling.steps import cps_kl, cps_log_prob, cps_mean_std, step_spec


def global_std(r: Tensor) -> float:
    """The std of the rewards of the whole global batch (accelerate's gather; the tensor itself on one process)."""
    from accelerate.utils import gather

    return float(gather(r.detach().float().contiguous()).double().std())


class RTDMD(Recipe):
    Config: ClassVar[type] = RTDMDConfig
    name: ClassVar[str] = "rtdmd"

    def __init__(self, *, core: ACDMD, config: RTDMDConfig, rewards: RewardLoss, bp: RewardLoss | None,
                 reference: nn.Module | None = None) -> None:
        self.core, self.cfg, self.rewards, self.bp, self.reference = core, config, rewards, bp, reference
        self.times = core.times

    def trainable(self) -> dict[str, nn.Module]:
        return self.core.trainable()

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        return self.core.parameters(role)

    def inference(self) -> InferenceSpec:
        return self.core.inference()

    def export_net(self) -> nn.Module:
        return self.core.export_net()

    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        c, core = self.cfg, self.core
        leaders = group_leaders(len(batch.prompts), c.group_size)
        group = Batch(x0=batch.x0, cond={k: v[leaders.to(v.device)] for k, v in batch.cond.items()}, neg=batch.neg,
                      prompts=[batch.prompts[i] for i in leaders.tolist()])
        epoch_seed = draws.choice(0, 2**31 - 1)
        selected = select_steps(epoch_seed, 0, c.step_first, c.step_last, c.train_steps)
        states, nexts, logp_old, final = self.rollout(group, draws, selected, epoch_seed)
        with torch.no_grad():
            r, reward_metrics = self.rewards.scores(final, group.prompts)
        adv = local_advantages(r, c.group_size, global_std(r), c.adv_clip)
        n = len(final)
        ppo, kl = self.policy_terms(group, states, nexts, logp_old, adv, selected)
        m = len(self.times) - 1                  # the deterministic last step: AC-DMD aux (s = 0) and BP
        x_last = core.student(states[m - 1], self.times[m - 1].expand(n), group.cond)
        tau = core.renoise_times(n, 0.0, draws.sample, x_last.device)
        x_tau = subinterval_noise(x_last, 0.0, tau, core.schedule, noise=randn(x_last.shape, draws.sample))
        aux, grad_norm = core.student_loss(x_last, 0.0, x_tau, tau, group, draws.sample)
        loss = ppo + c.kl_weight * kl + c.aux_weight * aux
        metrics = {"loss/ppo": float(ppo.detach()), "loss/aux": float(aux.detach()), "dm_grad_norm": grad_norm,
                   "advantage_abs": float(adv.abs().mean()), **reward_metrics}
        if self.reference is not None:
            metrics["loss/kl"] = float(kl.detach())
        if self.bp is not None:
            bp, _ = self.bp.loss(x_last, group.prompts)
            loss = loss + bp
            metrics["loss/bp"] = float(bp.detach())
        critic, metrics["loss/consistency"] = core.critic_loss(x_last.detach(), 0.0, x_tau, tau, group, draws.sample)
        return StepOutput({"student": loss, "critic": critic}, metrics)

    def policy_terms(self, group: Batch, states: list[Tensor], nexts: list[Tensor], logp_old: list[Tensor],
                     adv: Tensor, selected: list[int]) -> tuple[Tensor, Tensor]:
        """The clipped PPO surrogate on the trained stochastic steps and the KL to the stage-1 policy there (zero
        without a reference), each a mean over the batch's rows and the trained steps. Rows with a zero advantage
        need no compute unless the KL sees every row."""
        core, c = self.core, self.cfg
        n = len(states[0])
        ppo = kl = torch.zeros((), device=states[0].device)
        keep = torch.arange(n) if self.reference is not None else torch.nonzero(adv != 0).flatten()
        for j in selected if len(keep) else []:
            x_j, t, t1 = states[j][keep], self.times[j].expand(len(keep)), self.times[j + 1].expand(len(keep))
            cond = {k: v[keep.to(v.device)] for k, v in group.cond.items()}
            mean, _ = cps_mean_std(x_j, core.student(x_j, t, cond), t, t1, core.schedule, c.eta)
            terms = ppo_terms(cps_log_prob(nexts[j][keep], mean), logp_old[j][keep], adv[keep].to(mean.device),
                              c.clip_range)
            ppo = ppo + terms.sum() / (n * len(selected))
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = cps_mean_std(x_j, self.reference(x_j, t, cond), t, t1, core.schedule, c.eta)
                kl = kl + cps_kl(mean, ref).sum() / (n * len(selected))
        return ppo, kl

    @torch.no_grad()
    def rollout(self, batch: Batch, draws: Draws, selected: list[int],
                epoch_seed: int) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
        """The M-step CPS rollout without gradients: the inputs x_j of every step, the outputs x_{j+1} and CPS
        log-probabilities of the stochastic ones, and the final x0. Selected steps draw per-sample noise (keyed by
        global position); the others the prompt group's shared noise (`shared_noise`)."""
        core, c = self.core, self.cfg
        dev = next(iter(batch.cond.values())).device
        x = randn((len(batch.prompts), *core.shape), draws.sample, dev)
        states, nexts, logps = [], [], []
        m = len(self.times) - 1
        for j in range(m - 1):
            t, t1 = self.times[j].expand(len(x)), self.times[j + 1].expand(len(x))
            mean, rho = cps_mean_std(x, core.student(x, t, batch.cond), t, t1, core.schedule, c.eta)
            z = (randn(x.shape, draws.sample, dev) if j in selected
                 else shared_noise(batch.prompts, x.shape[1:], j, epoch_seed).to(dev))
            x_next = mean + rho * z
            states.append(x)
            nexts.append(x_next)
            logps.append(cps_log_prob(x_next, mean))
            x = x_next
        states.append(x)
        final = core.student(x, self.times[m - 1].expand(len(x)), batch.cond)
        return states, nexts, logps, final


def build_rtdmd(cfg: DictConfig, teacher: Teacher) -> RTDMD:
    """The student (fresh LoRA, or full weights) and fake score on the stage-1 network (`teacher.pretrained`), the
    original teacher (`method.real_teacher_path`) as the frozen real score, the rewards frozen on the device."""
    method = OmegaConf.to_object(cfg.method)
    sc = build_student_and_critic(cfg, teacher, method.critic_mode, method.critic_rank, method.critic_alpha)
    device = next(teacher.net.parameters()).device
    original = load_teacher(method.real_teacher_path, dtype=cfg.teacher.dtype, device=device)
    original.net.requires_grad_(False).eval()
    if (original.family.name, original.latent_shape()) != (teacher.family.name, teacher.latent_shape()):
        raise FewstepError(f"method.real_teacher_path={method.real_teacher_path} is a {original.family.name} teacher "
                           f"with latents {original.latent_shape()}, teacher.pretrained a {teacher.family.name} one "
                           f"with {teacher.latent_shape()}: point method.real_teacher_path at the original teacher "
                           "the stage-1 export was distilled from")
    ac = ACDMDConfig(eta=method.eta, real_guidance=method.real_guidance, renoise_t_min=method.renoise_t_min,
                     renoise_t_max=method.renoise_t_max, critic_weight_cap=method.critic_weight_cap,
                     consistency_weight=method.consistency_weight, consistency_max_dt=method.consistency_max_dt,
                     norm_min=method.norm_min, critic_mode=method.critic_mode)
    spec = inference_spec(cfg, teacher, step_spec("cps", eta=method.eta), dmd_student_times)
    core = ACDMD(student=sc.student, student_net=sc.net, student_params=sc.student_params,
                 real=WithAdapter(original.denoiser(original.net), None), critic=sc.critic,
                 critic_params=sc.critic_params, schedule=teacher.schedule, latent_shape=teacher.latent_shape(),
                 config=ac, inference=spec, critic_space="flow" if teacher.schedule.kind == "flow" else "eps")
    rewards = build_reward_loss(method.reward, 1.0, None, teacher)
    assert rewards is not None
    bp = RewardLoss(rewards.terms, rewards.decode, method.bp_weight, method.bp_margin) if method.bp_weight > 0 else None
    # the KL's reference, the stage-1 network with no adapter live: the frozen base the other recipes' teacher score
    # is (LoRA students sit on it in place, full students copy it)
    reference = WithAdapter(teacher.denoiser(teacher.net), None) if method.kl_weight > 0 else None
    return RTDMD(core=core, config=method, rewards=rewards, bp=bp, reference=reference)
