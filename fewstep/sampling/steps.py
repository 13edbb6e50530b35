"""Pure sampler steps in fewstep's convention. Each maps (x_t, x0 estimate, t, t_next) to x_{t_next}.

The denoiser returns x0; a step decides how to move to the next time. All steps are checked against diffusers'
own schedulers (`tests/test_steps_oracle.py`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from fewstep.diffusion.forward import diffuse, transition
from fewstep.diffusion.param import eps_from_x0
from fewstep.diffusion.schedule import Schedule, bcast

Generators = torch.Generator | Sequence[torch.Generator] | None
Step = Callable[..., Tensor]
NoiseFn = Callable[[Sequence[int], Generators, torch.device, torch.dtype], Tensor]


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise; a list of generators gives one per sample (diffusers' `randn_tensor` convention), so each
    image depends only on its own seed. Drawn on the generator's device (CPU here), then moved."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def ddim_step(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
              generator: Generators = None, noise_fn: NoiseFn = randn) -> Tensor:
    """Deterministic DDIM, eta = 0 (Song et al. 2021, Eq. 12): keep the implied noise, move to t_next.
    For rectified flow this is exactly the Euler step x + (t_next - t) u. At t_next = 0 it returns x0 (DDIM with
    `set_alpha_to_one`, the final Euler step to sigma = 0)."""
    if bool((t_next == 0).all()):
        return x0
    return ddim_transfer(x_t, x0, t, t_next, schedule)


def ddim_transfer(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule) -> Tensor:
    """x_{t_next} = alpha' x0 + sigma' eps_hat, with no special case at t_next = 0 (the table's first entry is
    not clean on DDPM tables; LCM's solver keeps it, algorithms.md §1.3)."""
    a, s = (bcast(v, x_t) for v in schedule.alpha_sigma(t))
    a_next, s_next = (bcast(v, x_t) for v in schedule.alpha_sigma(t_next))
    return a_next * x0 + s_next * eps_from_x0(x0, x_t, a, s)


def renoise_step(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
                 generator: Generators = None, noise_fn: NoiseFn = randn) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): jump to x0, then add fresh noise at t_next.
    `noise_fn` lets a family draw the noise in its pipeline's memory layout (FLUX's packed tokens), so the same
    generators give the same images as the stock scheduler."""
    if bool((t_next == 0).all()):
        return x0
    return diffuse(x0, t_next, schedule, noise_fn(x0.shape, generator, x0.device, x0.dtype))


def lcm_boundary(timestep: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM boundary scalings (Luo et al. 2023, Eq. 9; diffusers LCMScheduler): c_skip(0) = 1, c_out(0) = 0.
    `timestep` is the diffusers integer timestep."""
    scaled = timestep.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_x0(x_t: Tensor, x0: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0 on VP tables (the LCM parameterisation); the identity on x0 otherwise."""
    if schedule.kind != "vp":
        return x0
    c_skip, c_out = (bcast(v, x_t) for v in lcm_boundary(schedule.model_timestep(t).round()))
    return c_skip * x_t + c_out * x0


def consistency_step(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
                     generator: Generators = None, noise_fn: NoiseFn = randn) -> Tensor:
    """One LCMScheduler step: boundary-scaled x0, then re-noise to t_next (returns x0 when t_next = 0)."""
    denoised = consistency_x0(x_t, x0, t, schedule)
    if bool((t_next == 0).all()):
        return denoised
    return renoise_step(x_t, denoised, t, t_next, schedule, generator, noise_fn)


def tcd_step(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
             generator: Generators = None, noise_fn: NoiseFn = randn, gamma: float = 0.3) -> Tensor:
    """Strategic stochastic sampling of TCD (Zheng et al. 2024, Eq. 11; diffusers TCDScheduler): a DDIM jump to
    s = (1 - gamma) t_next, then forward diffusion from s to t_next. gamma = 0 is DDIM, gamma = 1 is LCM re-noising."""
    s = (1 - gamma) * t_next
    if schedule.kind == "vp":  # diffusers floors s onto the integer table
        n = schedule.model_timestep(torch.ones(())).item()
        s = torch.floor(schedule.model_timestep(s).double()) / n
    x_s = ddim_transfer(x_t, x0, t, s, schedule)
    if gamma <= 0 or bool((t_next == 0).all()):
        return x_s
    return transition(x_s, s, t_next, schedule, noise_fn(x_s.shape, generator, x_s.device, x_s.dtype))


def cps_mean_std(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
                 eta: float = 0.9) -> tuple[Tensor, Tensor]:
    """Mean and noise scale of the coefficients-preserving sampling step (CPS; RTDMD, algorithms.md §6.2), on any
    Gaussian path: with theta = eta pi / 2 and eps_hat the noise x_t implies,

        x' = alpha' x0 + sigma' cos(theta) eps_hat + sigma' sin(theta) z,   z ~ N(0, I).

    On rectified flow (alpha = 1 - sigma) this is the official flow form; on a DDPM table it is the same step with
    alpha' = sqrt(abar'), i.e. DDIM with noise std rho = sigma' sin(theta) (Song et al. 2021, Eq. 12): the
    coefficients of x0 and of the total noise are those of the forward marginal at t' for every eta. Returns
    (mean, rho) with rho broadcast to x_t; at t' = 0 the mean is x0 and rho = 0."""
    theta = eta * math.pi / 2
    a, s = (bcast(v, x_t) for v in schedule.alpha_sigma(t))
    a_next, s_next = (bcast(v, x_t) for v in schedule.alpha_sigma(t_next))
    eps = eps_from_x0(x0, x_t, a, s)
    last = bcast(t_next == 0, x_t).bool()       # the step to t' = 0 is x0 (DDPM tables are not clean at index 0)
    mean = torch.where(last, x0, a_next * x0 + s_next * math.cos(theta) * eps)
    return mean, torch.where(last, 0.0, s_next * math.sin(theta)).expand_as(x_t)


def cps_step(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule, generator: Generators = None,
             noise_fn: NoiseFn = randn, eta: float = 0.9) -> Tensor:
    """One CPS step (`cps_mean_std`): eta = 0 is DDIM / Euler, eta = 1 is consistency re-noising (x0 plus fresh
    noise at t'), and the step to t' = 0 returns x0 without drawing noise (the official deterministic last step)."""
    if bool((t_next == 0).all()):
        return x0
    mean, rho = cps_mean_std(x_t, x0, t, t_next, schedule, eta)
    return mean + rho * noise_fn(x_t.shape, generator, x_t.device, x_t.dtype)


def cps_log_prob(x_next: Tensor, mean: Tensor) -> Tensor:
    """RTDMD's per-sample log-probability of a CPS transition: -mean over C, H, W of (x' - mean)^2, without the
    1 / (2 rho^2) factor or constants (algorithms.md §6.4; the PPO clip range of 1e-5 is tuned to this scale).
    It is 0 on the deterministic last step (x' = mean there), so that step's PPO ratio is exactly 1."""
    return -(x_next - mean).pow(2).flatten(1).mean(1)


def cps_kl(mean: Tensor, ref_mean: Tensor) -> Tensor:
    """Per-sample KL between two CPS transitions from the same x_t with the same noise scale rho (the student's and
    a reference policy's), on `cps_log_prob`'s scale: mean over C, H, W of (mean - ref_mean)^2. The exact Gaussian
    KL is sum (mean - ref_mean)^2 / (2 rho^2); both it and the log-probability drop the same factor 2 rho^2 / (C H
    W), so a KL weight and the PPO advantages stay in one unit (the per-step KL penalty of Flow-GRPO, Liu et al. 2025)."""
    return (mean - ref_mean).pow(2).flatten(1).mean(1)


class DPMSolver2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, data prediction), as diffusers' DPMSolverMultistepScheduler runs
    it with solver_order=2, lower_order_final and final_sigmas_type="zero": the first step is first order (it
    equals DDIM), later steps use the previous x0 (multistep), and the step to t = 0 returns x0. With
    lambda = log(alpha / sigma), h = lambda' - lambda and r = h_prev / h:

        x' = (sigma' / sigma) x - alpha' (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r)).

    The only stateful step: `make_step("dpmsolver")` gives a fresh one per trajectory (a time that does not
    decrease also starts a new one)."""

    def __init__(self) -> None:
        self.prev: tuple[Tensor, Tensor] | None = None     # (x0, lambda) of the previous step
        self._t_prev: Tensor | None = None

    def __call__(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
                 generator: Generators = None, noise_fn: NoiseFn = randn) -> Tensor:
        if self.prev is not None and bool((t >= self._t_prev).all()):
            self.prev = None
        self._t_prev = t
        if bool((t_next == 0).all()):
            self.prev = None
            return x0
        a, s = (bcast(v.double(), x_t) for v in schedule.alpha_sigma(t))
        a_next, s_next = (bcast(v.double(), x_t) for v in schedule.alpha_sigma(t_next))
        lam, lam_next = torch.log(a / s), torch.log(a_next / s_next)
        h = lam_next - lam
        d = x0.double()
        if self.prev is not None:
            x0_prev, lam_prev = self.prev
            r = (lam - lam_prev) / h
            d = d + (d - x0_prev) / (2 * r)
        self.prev = (x0.double(), lam)
        return ((s_next / s) * x_t.double() - a_next * torch.expm1(-h) * d).to(x_t.dtype)


STEPS: dict[str, Step] = {"ddim": ddim_step, "euler": ddim_step, "consistency": consistency_step,
                          "renoise": renoise_step, "tcd": tcd_step, "cps": cps_step}
STEP_OPTIONS: dict[str, tuple[str, ...]] = {"tcd": ("gamma",), "cps": ("eta",)}
MULTISTEP: dict[str, Callable[[], Step]] = {"dpmsolver": DPMSolver2M}
STEP_NAMES = (*STEPS, *MULTISTEP)


def parse_step(spec: str) -> tuple[str, dict[str, float]]:
    """A sampler spec, the string every InferenceSpec, export and CLI carries: a step name, optionally with its
    float options, e.g. "cps:eta=0.9" or "tcd:gamma=0.3" -> ("cps", {"eta": 0.9})."""
    name, _, rest = spec.partition(":")
    if name not in STEP_NAMES:
        raise ValueError(f"unknown sampler step {name!r}; choose one of {list(STEP_NAMES)}")
    options: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in STEP_OPTIONS.get(name, ()) or not eq:
            raise ValueError(f"sampler {spec!r}: {name!r} takes {list(STEP_OPTIONS.get(name, ())) or 'no options'}, "
                             f"written as {name}:key=value")
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"sampler {spec!r}: {key} must be a number, got {value!r}") from None
    return name, options


def step_spec(name: str, **options: float) -> str:
    """The inverse of `parse_step`: ("cps", eta=0.9) -> "cps:eta=0.9" (options sorted, so specs compare equal)."""
    return name + (":" + ",".join(f"{k}={float(options[k])!r}" for k in sorted(options)) if options else "")


def make_step(spec: str) -> Step:
    """The step function for a sampler spec (`parse_step`), its options bound; multistep solvers (which keep
    history) come fresh for each trajectory."""
    name, options = parse_step(spec)
    if name in MULTISTEP:
        return MULTISTEP[name]()
    return partial(STEPS[name], **options) if options else STEPS[name]
