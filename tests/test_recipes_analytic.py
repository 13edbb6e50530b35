"""The real recipe classes learn on analytic teachers (algorithms.md §0.7; issue 11 item 3).

Each test builds `LCM`, `DMD2`, `PhasedDMD` or `TDM` with closed-form teacher denoisers (no pipeline, no weights),
small trainable networks, and steps it with the trainer's own optimizer step (`fewstep.train.step`): AdamW per role
with the recipe's per-role settings, the summed losses back-propagated once, each stepped role clipped and
stepped. What each recipe must learn has a closed form, so the tests compare against it.

All paths are rectified flow (x_t = (1 - t) x0 + t eps), whose t = 1 is pure noise, so the students start from the
same noise the teacher's marginal has. Tolerances are stated per test; the Monte-Carlo part of each is the standard
error of the test's own sample estimate (N = 20 000 samples: SE(mean) = std / 141, SE(std) = std / 200), and
every test also checks that the untrained student is far outside its tolerance, so a recipe that learns nothing, or
learns the wrong sign, fails.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from fewstep.data.toy import GaussianDenoiser, GaussianMixtureDenoiser, mode_coverage, ring_means
from fewstep.diffusion.schedule import RectifiedFlow, bcast
from fewstep.methods.dmd2 import DMD2Config
from fewstep.methods.lcm import LCMConfig
from fewstep.methods.phased_dmd import PhasedDMDConfig
from fewstep.methods.tdm import TDMConfig
from fewstep.recipes.base import Batch, InferenceSpec, Recipe
from fewstep.recipes.dmd2 import DMD2
from fewstep.recipes.lcm import LCM
from fewstep.recipes.phased_dmd import PhasedDMD, phase_bounds
from fewstep.recipes.tdm import TDM, table_times
from fewstep.sampling.engine import sample
from fewstep.sampling.steps import STEPS
from fewstep.sampling.draws import Draws
from fewstep.train.step import RoleOptimizers, train_iteration

N_EVAL = 20_000


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ----------------------------------------------------------------------------------------------------- helpers

def _mlp(n_in: int, n_out: int, width: int = 64, zero_last: bool = True) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, n_out))
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


class AffineFlow(nn.Module):
    """A flow-parameterised denoiser whose velocity is affine in x with time-dependent coefficients:
    x0 = x - t (A(t) x + B(t)), A and B from a small MLP of t (zero-initialised: x0 = x_t, a student that returns
    its input noise). Gaussian laws on a flow path have exactly this form of posterior mean (§0.7), so every fake
    score and student the Gaussian tests need is in the family."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim, self.coef = dim, _mlp(1, 2 * dim, width=32)

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        a, b = self.coef(t.float()[:, None]).chunk(2, dim=1)
        return x - bcast(t.float(), x) * (a * x + b)


class Student1Step(nn.Module):
    """x = z + f(3 z), f zero-initialised: starts at N(0, I), which is rotation invariant, so no ring mode is
    favoured at step 0; the input gain 3 lets f form sharp sector boundaries quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.f = _mlp(2, 2)

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return x + self.f(3 * x)


class FlowCritic(nn.Module):
    """A free-form fake score for the 2-D ring: x0 = x_t - t v(x_t, t), v an MLP."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.v = _mlp(dim + 1, dim, zero_last=False)

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return x - bcast(t.float(), x) * self.v(torch.cat([x, t.float()[:, None]], 1))


def prompt_batch(n: int, x0: Tensor | None = None) -> Batch:
    """Data-free batches carry only conditions; the analytic teachers ignore them (one class)."""
    cond = {"label": torch.zeros(n, 1)}
    return Batch(x0=torch.empty(0) if x0 is None else x0, cond=cond, neg={"label": torch.zeros(n, 1)},
                 prompts=[""] * n)


def fit(recipe: Recipe, batch: Callable[[int, torch.Generator], Batch], steps: int, lr: float, betas: tuple[float, float] = (0.0, 0.99),
        schedule: str = "cosine", seed: int = 0) -> None:
    """`steps` iterations of the trainer's own optimizer step (fewstep.train.step)."""
    train = SimpleNamespace(lr=lr, betas=betas, adam_eps=1e-8, weight_decay=0.0, lr_schedule=schedule, warmup_steps=0, steps=steps,
                            grad_clip=0.0, gradient_accumulation_steps=1)
    optim, gen = RoleOptimizers(recipe, train, Accelerator(cpu=True)), torch.Generator().manual_seed(seed)
    draws = Draws.from_generator(gen)
    for step in range(steps):
        train_iteration(recipe, optim, lambda micro: batch(step, gen), lambda micro: draws, step)


def params(*modules: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    return {f"{prefix}{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters()}


@torch.no_grad()
def student_samples(recipe: Recipe, student: nn.Module, dim: int) -> Tensor:
    """N_EVAL samples of the student's own sampler (the InferenceSpec it exports), fixed seed."""
    spec = recipe.inference()
    noise = torch.randn(N_EVAL, dim, generator=torch.Generator().manual_seed(123))
    return sample(student, noise, torch.tensor(spec.times, dtype=torch.float64), recipe.schedule,
                  step=STEPS[spec.step], generator=torch.Generator().manual_seed(321))


def gaussian_error(x: Tensor, mu: float, std: float) -> tuple[float, float]:
    """(|mean - mu| / std, |std(x) / std - 1|): the law error in units of the target's std."""
    return abs(float(x.mean()) - mu) / std, abs(float(x.std()) / std - 1)


# ------------------------------------------------------------------------------------------------------ DMD2

def test_dmd2_one_step_student_covers_the_ring_modes():
    """DMD2 without GAN (§3.4-3.5) on the 2-D 8-mode ring (std 0.15, radius 2): a 1-step MLP student from pure
    noise and an MLP fake score trained with the flow-matching loss on t ~ U[0.1, 1] (1/t^2 weights up to 100), 2
    critic steps per student step, Adam betas (0, 0.99), constant lr 2e-3 (critic 5e-3, two time scales), batch
    512, 6000 iterations (3000 student steps, about 15 s). Observed with training seeds 0, 1, 2: 80.1 / 80.3 /
    78.9 % within 3 sigma, largest mode deviation 5.9 / 7.4 / 7.9 %. The bar (issue 11): >= 70 % (exact samples
    score 98.9 %, an angularly uniform ring 54 %: test_dmd_math::test_mode_coverage_separates_modes_from_a_ring)
    and every mode within +-10 % of 1/8 (the per-mode share's Monte-Carlo error at N = 20 000 is 1.9 % of 1/8)."""
    torch.manual_seed(0)
    sched, means, std, n = RectifiedFlow(), ring_means(8, 2.0), 0.15, 512
    student, critic = Student1Step(), FlowCritic()
    recipe = DMD2(student=student, student_net=student, student_params=params(student), real=GaussianMixtureDenoiser(
        means, std, sched), critic=critic, critic_params=params(critic), schedule=sched, latent_shape=(2,),
        config=DMD2Config(critic_steps_per_student_step=2, real_guidance=1.0, critic_t_min=0.1, critic_lr=5e-3),
        inference=InferenceSpec(times=[1.0, 0.0], step="consistency"), critic_space="flow")
    before, _ = mode_coverage(student_samples(recipe, student, 2), means, std)
    fit(recipe, lambda step, gen: prompt_batch(n), 6000, lr=2e-3, schedule="constant")
    share, per_mode = mode_coverage(student_samples(recipe, student, 2), means, std)
    assert before < 0.2, before
    assert share >= 0.70, share
    assert ((per_mode * 8 - 1).abs() <= 0.10).all(), per_mode


# ------------------------------------------------------------------------------------------------------- LCM

@torch.no_grad()
def affine_map(step: Callable[[Tensor, float], Tensor], t: float) -> tuple[float, float]:
    """(slope, intercept) of an affine map x_t -> x0 at time t (dim 1), from two probe points."""
    y = step(torch.tensor([[0.0], [1.0]], dtype=torch.float64), t)
    return float(y[1] - y[0]), float(y[0])


def at_time(denoiser: nn.Module) -> Callable[[Tensor, float], Tensor]:
    """A denoiser as a map (x, t) -> x0 with one time for the whole batch."""
    return lambda x, t: denoiser(x, torch.full((len(x),), t))


def solver_map(teacher: nn.Module, grid: Tensor, i: int):
    """The teacher's own DDIM solver from grid[i] down to 0 on LCM's grid: the map LCM distils (affine here)."""
    from fewstep.sampling.steps import ddim_transfer

    def run(x: Tensor, t: float) -> Tensor:
        for j in range(i, 0, -1):
            tj, tn = grid[j].expand(len(x)), grid[j - 1].expand(len(x))
            x = ddim_transfer(x, teacher(x, tj).double(), tj, tn, teacher.schedule)
        return x
    return run


def test_lcm_student_reaches_the_pf_ode_map_of_a_gaussian_teacher():
    """LCM (§1, full student with its EMA target, pseudo-Huber loss, w = 1) on x0 ~ N(1.5, 0.5^2) with the exact
    Gaussian teacher, a 20-interval solver grid and data batches of 256 real samples. The PF-ODE map from t to 0 is
    x0 = mu + std (x_t - a mu) / sqrt(a^2 std^2 + b^2) (§0.7), affine; the student's one-step map at
    t in {1, 0.6, 0.3} must match it. Tolerance = the teacher solver's own discretisation error against the exact
    map (computed here by composing its 20 DDIM hops; LCM's fixed point is the solver's map, not the exact one) +
    0.03 in slope and 0.05 std in intercept for the optimisation; the student must also be that close to the
    solver's map itself. Observed distance to the solver's map: slope <= 0.009, intercept <= 0.015 (0.029 std)."""
    torch.manual_seed(0)
    sched, mu, std, n_grid = RectifiedFlow(), 1.5, 0.5, 20
    teacher, student = GaussianDenoiser(mu, std**2, sched), AffineFlow(1)
    target = __import__("copy").deepcopy(student).requires_grad_(False)
    grid = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)
    recipe = LCM(student=student, student_net=student, real=teacher, target=target, target_net=target,
                 schedule=sched, grid=grid, config=LCMConfig(num_ddim_timesteps=n_grid, guidance_min=1.0,
                                                             guidance_max=1.0),
                 inference=InferenceSpec(times=[1.0, 0.0], step="consistency"))

    def data(step: int, gen: torch.Generator) -> Batch:
        return prompt_batch(256, mu + std * torch.randn(256, 1, generator=gen))

    def exact(x: Tensor, t: float) -> Tensor:
        a, b = 1 - t, t
        return mu + std * (x - a * mu) / math.sqrt(a**2 * std**2 + b**2)

    checks = {1.0: n_grid, 0.6: 12, 0.3: 6}                                         # t -> its grid index
    start = [abs(u - v) for u, v in zip(affine_map(at_time(student), 1.0), affine_map(exact, 1.0))]   # identity map: x0 = x_t
    fit(recipe, data, 3000, lr=1e-2)
    for t, i in checks.items():
        slope, intercept = affine_map(at_time(student), t)
        ref_slope, ref_intercept = affine_map(exact, t)
        solver_slope, solver_intercept = affine_map(solver_map(teacher, grid, i), t)
        print(f"t={t}: student {slope:.4f} / {intercept:.4f}, solver {solver_slope:.4f} / {solver_intercept:.4f}, "
              f"exact {ref_slope:.4f} / {ref_intercept:.4f} (slope / intercept)")
        assert abs(slope - solver_slope) <= 0.03 and abs(intercept - solver_intercept) <= 0.05 * std
        assert abs(slope - ref_slope) <= abs(solver_slope - ref_slope) + 0.03, (t, slope, ref_slope)
        assert abs(intercept - ref_intercept) <= abs(solver_intercept - ref_intercept) + 0.05 * std, (t, intercept)
    assert start[0] > 10 * 0.03 and start[1] > 10 * 0.03 * std, start


# ------------------------------------------------------------------------------------- Phased DMD and TDM

MU, STD, DIM = 1.5, 0.5, 16
"""The Gaussian target of the multi-step tests: x0 ~ N(1.5, 0.5^2) in each of 16 independent coordinates. One
coordinate alone is ill-conditioned for the DMD family: its normaliser mean_CHW |x - x0_real| is then one number
per sample, which makes single-sample gradients arbitrarily large; 16 coordinates average it as an image does."""


def law_error(x: Tensor) -> tuple[float, float]:
    """(mean - mu) / std and std(x) / std - 1, averaged over the coordinates."""
    return float(x.mean() - MU) / STD, float(x.std(0).mean() / STD - 1)


class PhaseSwitch(nn.Module):
    """The student of a 2-phase Phased DMD run: expert "phase0" while t > bound, "phase1" after (what
    `ExpertSwitch` does with LoRA adapters, here with two separate networks)."""

    def __init__(self, experts: nn.ModuleDict, bound: float) -> None:
        super().__init__()
        self.experts, self.bound = experts, bound

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return self.experts["phase0" if float(t.reshape(-1)[0]) > self.bound else "phase1"](x, t, cond)


def test_phased_dmd_matches_a_gaussian_target_in_both_phases():
    """Phased DMD (§4) with 2 phases of 1 step on times 1 -> 0.5 -> 0, progressive schedule, critics of the exact
    (affine) family, constant lr 3e-3, 4000 iterations, batch 256. Phase 0 matches its output's law *at the boundary
    s = 0.5* through the subinterval target; for Gaussians that fixes the law of its x0 to the data law itself
    (deconvolution by a known Gaussian kernel is unique), and phase 1 is plain DMD on the final sample. Both laws
    must be N(1.5, 0.5^2): mean within 0.15 std and std within 5 % (final) / 12 % (phase 0's x0). Observed over
    training seeds 0, 1, 2: final mean -0.02 / -0.09 / -0.04 std, std +0.1 / -1.2 / -1.2 %; phase 0 mean 0.03 /
    -0.05 / 0.00 std, std -2.3 / 2.0 / 7.9 %. The Monte-Carlo error of the estimates is 0.007 std (N = 20 000);
    the untrained student (x0 = x_t) is 3 std off in mean."""
    torch.manual_seed(0)
    sched, iters = RectifiedFlow(), 4000
    net = nn.ModuleDict({"phase0": AffineFlow(DIM), "phase1": AffineFlow(DIM)})
    critics = [AffineFlow(DIM), AffineFlow(DIM)]
    student = PhaseSwitch(net, 0.5)
    spec = InferenceSpec(times=[1.0, 0.5, 0.0], step="consistency")
    assert phase_bounds([1, 1], spec.times) == [(0, 1, 0.5), (1, 2, 0.0)]
    recipe = PhasedDMD(student=student, net=net, expert_params=dict(net.named_parameters()), critics=critics,
                       critic_params=params(*critics, prefix="critic"), real=GaussianDenoiser(MU, STD**2, sched),
                       schedule=sched, latent_shape=(DIM,), config=PhasedDMDConfig(
                           phase_steps=[1, 1], real_guidance=1.0, critic_steps_per_student_step=2),
                       inference=spec, critic_space="x0", total_steps=iters)
    phase0_x0: list[Tensor] = []

    def keep_first(i: int, t: Tensor, x: Tensor, x0: Tensor) -> None:
        if i == 0:
            phase0_x0.append(x0)

    before = law_error(student_samples(recipe, student, DIM))
    fit(recipe, lambda step, gen: prompt_batch(256), iters, lr=3e-3, schedule="constant")
    with torch.no_grad():
        final = sample(student, torch.randn(N_EVAL, DIM, generator=torch.Generator().manual_seed(123)),
                       torch.tensor(spec.times, dtype=torch.float64), sched, step=STEPS[spec.step],
                       generator=torch.Generator().manual_seed(321), callback=keep_first)
    (mean_f, std_f), (mean_0, std_0) = law_error(final), law_error(phase0_x0[0])
    assert abs(before[0]) > 2.5, before
    assert abs(mean_f) <= 0.15 and abs(std_f) <= 0.05, (mean_f, std_f)
    assert abs(mean_0) <= 0.15 and abs(std_0) <= 0.12, (mean_0, std_0)


@pytest.mark.parametrize("loss,std_tol", [("l2", 0.05), pytest.param("huber", 0.25, marks=pytest.mark.slow)])  # 25 s each
def test_tdm_matches_a_gaussian_target(loss, std_tol):
    """TDM (§5) data-free: 4-step deterministic DDIM student on the flow table (K_T = 1000: times 0.999, 0.749,
    0.499, 0.249), separate intervals, importance weight on, the fake score (exact affine family) trained on the
    student's regenerated trajectory, 1 : 1 updates, the student at lr / 5, Adam betas (0, 0.95), lr 1e-2 cosine,
    4000 iterations, batch 256.

    What must hold: in the last step's interval the state before the transition is x0hat itself (t_mid = 0), so
    the mixed noise is the fresh noise, w_IS = 1, and the update is plain DMD on the final sample, whose fixed
    point is the data law. The earlier states are not pinned to the teacher's marginals: the fake score regresses
    the student's x0hat, not a clean sample, so their fixed point is biased by construction (observed: their std
    1-13 % above the marginal's, means within 0.01) and is not asserted.

    Tolerances: mean within 0.15 std. With `loss=l2` the std must be within 5 % (observed over training seeds
    0, 1, 2: mean +0.10 / +0.09 / +0.08 std, std +1.5 / +0.4 / +2.3 %). With the default pseudo-Huber loss
    (sign-DMD, c = 1e-3) the update keeps its size near the fixed point and the final law settles narrower:
    observed over seeds 0, 1, 2: mean -0.02 / -0.06 / -0.01 std, std -13 / -17 / -17 %, so its bar is 25 %, a measured property of the loss, not a target."""
    torch.manual_seed(0)
    sched = RectifiedFlow()
    student, critic = AffineFlow(DIM), AffineFlow(DIM)
    recipe = TDM(student=student, student_net=student, student_params=params(student),
                 real=GaussianDenoiser(MU, STD**2, sched), critic=critic, critic_params=params(critic), schedule=sched,
                 to_t=table_times(sched), latent_shape=(DIM,),
                 config=TDMConfig(total_steps=1000, real_guidance=1.0, loss=loss), steps=4, student_lr=1e-2 * 0.2)
    assert [round(t, 3) for t in recipe.inference().times] == [0.999, 0.749, 0.499, 0.249, 0.0]
    before = law_error(student_samples(recipe, student, DIM))
    fit(recipe, lambda step, gen: prompt_batch(256), 4000, lr=1e-2, betas=(0.0, 0.95))
    mean, std = law_error(student_samples(recipe, student, DIM))
    assert abs(before[0]) > 2.5 and before[1] > 0.9, before
    assert abs(mean) <= 0.15 and abs(std) <= std_tol, (mean, std)
