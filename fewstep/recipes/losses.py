"""Loss functions shared by recipes: small, pure, cited."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.diffusion.forward import transition, transition_coeffs
from fewstep.diffusion.param import from_x0
from fewstep.diffusion.schedule import Schedule, bcast


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Pseudo-Huber loss sqrt((a - b)^2 + c^2) - c (Song & Dhariwal 2023, §3.3; LCM scripts), mean over elements."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()


def l2(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred.float() - target.float()) ** 2).mean()


def consistency_loss(pred: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """The consistency-distillation distance d(f_theta, f_target) (Luo et al. 2023, Eq. 8)."""
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    if kind == "l2":
        return l2(pred, target)
    raise ValueError(f"unknown loss {kind!r}; use huber or l2")


@torch.no_grad()
def ema_update(target: list[Tensor], online: list[Tensor], decay: float) -> None:
    """theta_target <- decay * theta_target + (1 - decay) * theta_online (LCM's target network, Alg. 1)."""
    torch._foreach_lerp_(target, online, 1 - decay)


# ---------------------------------------------------------------------------------------------------------------
# The DMD family (algorithms.md §0.6, §2, §3.4, §4.2, §7.1). Directions are computed without graph and returned
# detached in float32; only `dmd_loss` carries graph, through its first argument (§8.2).
# ---------------------------------------------------------------------------------------------------------------

def _chw_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _finite(g: Tensor) -> Tensor:
    """DMD2's `nan_to_num` guard, with +-inf also mapped to 0 (an infinite direction is no direction)."""
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _dmd_normaliser(x: Tensor, x0_real: Tensor, eps_norm_min: float | None) -> Tensor:
    """mean_CHW |x - x0_real| per sample, float64 [B, 1, ...], clamped at `eps_norm_min` (LightX2V) when given."""
    norm = (x.detach().double() - x0_real.detach().double()).abs().mean(_chw_dims(x), keepdim=True)
    return norm if eps_norm_min is None else norm.clamp_min(eps_norm_min)


@torch.no_grad()
def dmd_direction(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps_norm_min: float | None = 1e-4) -> Tensor:
    """The DMD direction g = (x0_fake - x0_real) / mean_CHW|x - x0_real| (algorithms.md §0.6; DMD2
    `compute_distribution_matching_loss`; Yin et al. 2024 Eq. 7-8 with the weight w_t of Eq. 8).

    With w_t = (sigma_t^2 / alpha_t) * CS / ||x - x0_real||_1 this is exactly w_t (s_fake - s_real) at (x_t, t),
    so descending on `dmd_loss(x, g)` moves x along -g. Computed in float64 (DMD2 converts x0 in float64), then
    both guards: the per-sample normaliser is clamped at `eps_norm_min` (LightX2V `dmd_norm_clip_min = 1e-4`;
    None = DMD2's unclamped form) and non-finite entries become 0 (DMD2's `nan_to_num`).

    Args:
        x: generator sample [B, ...] (the graph is ignored here).
        x0_real: teacher (CFG) x0 estimate at (x_t, t) [B, ...].
        x0_fake: fake-score x0 estimate at the same (x_t, t) [B, ...].
    Returns: g, float32, detached, shape of x.
    """
    norm = _dmd_normaliser(x, x0_real, eps_norm_min)
    g = (x0_fake.double() - x0_real.double()) / norm
    return _finite(g).float()


def dmd_loss(x: Tensor, g: Tensor) -> Tensor:
    """Stop-gradient surrogate L = 0.5 mean((x - sg(x - g))^2) (algorithms.md §0.6): its value is
    0.5 mean(g^2) and dL/dx = g / numel(x), the mean running over all B*C*H*W elements."""
    x = x.float()
    return 0.5 * ((x - (x - g.float()).detach()) ** 2).mean()


def denoising_weight(t: Tensor, schedule: Schedule, space: str = "x0") -> Tensor:
    """Per-sample weight lambda(t) [B] that turns the x0-space MSE into another parameterisation's MSE at the same
    (x_t, t) (algorithms.md §0.2, §0.3; all conversions are affine in x0 with slope depending on t only):

        ||eps_hat - eps||^2 = (alpha/sigma)^2 ||x0_hat - x0||^2                    (space="eps", DMD2 SD)
        ||u_hat - u||^2     = ((alpha + sigma)/sigma)^2 ||x0_hat - x0||^2, u = eps - x0 (space="flow"; 1/t^2 on RF)
        ||v_hat - v||^2     = ((alpha^2 + sigma^2)/sigma)^2 ||x0_hat - x0||^2          (space="v", VP v-prediction)
    """
    a, s = (v.double() for v in schedule.alpha_sigma(t))
    if space == "x0":
        return torch.ones_like(a).float()
    coef = {"eps": a / s, "flow": (a + s) / s, "v": (a**2 + s**2) / s}.get(space)
    if coef is None:
        raise ValueError(f"unknown space {space!r}; use x0, eps, flow or v")
    return (coef**2).float()


def critic_denoising_loss(x0_pred: Tensor, x0_target: Tensor, weight: Tensor | None = None) -> Tensor:
    """The fake score's denoising loss in x0 space: mean_B[ lambda_b * mean_CHW (x0_pred - x0_target)^2 ]
    (algorithms.md §2.3, §3.4). `x0_target` is sg(generator sample); `weight` [B] is lambda(t): None gives the plain
    x0-MSE, `denoising_weight(t, schedule, "eps")` gives DMD2-SD's eps-MSE exactly, "flow" the flow-matching loss,
    and EDM's 1/sigma^2 + 1/sigma_d^2 can be passed directly."""
    per_sample = ((x0_pred.float() - x0_target.detach().float()) ** 2).mean(_chw_dims(x0_pred))   # [B]
    return per_sample.mean() if weight is None else (weight.float().to(per_sample.device) * per_sample).mean()


def eps_mse_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """DMD2-SD's unweighted eps-MSE ||eps_hat_F(x_t, t) - n||^2 (algorithms.md §3.4); equal to
    `critic_denoising_loss(x0_hat, x0, denoising_weight(t, schedule, "eps"))`."""
    return l2(eps_pred, eps)


def regression_loss(pred: Tensor, target: Tensor, kind: str = "l2", huber_c: float = 0.001) -> Tensor:
    """DMD1's regression term L_reg on teacher ODE pairs (z_ref, y_ref) (Yin et al. 2024, Eq. 9; algorithms.md §2.3).

    The paper uses LPIPS on decoded images; LPIPS needs pretrained VGG/AlexNet weights that fewstep does not ship
    and cannot download offline, so only weight-free distances exist: "l2" (mean squared error) and "huber"
    (pseudo-Huber with constant `huber_c`, Song & Dhariwal 2023 §3.3), both in latent space.
    """
    if kind == "l2":
        return l2(pred, target)
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    raise ValueError(f"unknown regression loss {kind!r}; use l2 or huber (LPIPS needs weights fewstep lacks)")


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss mean softplus(-D(x_gen)) (Goodfellow et al. 2014; DMD2 §3.4). The caller passes
    the gradient through the discriminator to x_gen, not into it (`through`)."""
    return F.softplus(-logits_fake.float()).mean()


def through(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) with its gradient reaching x and none of fn's parameters (the discriminator in the generator's GAN
    term): a surrogate whose value is fn(x) and whose gradient in x is d fn / dx, taken at once by
    `torch.autograd.grad`, which accumulates into no parameter under any engine (freezing the parameters instead
    does not reach the gathered copies FSDP2 computes with)."""
    probe = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(probe)
    (grad,) = torch.autograd.grad(value, probe)
    link = (x * grad.to(x.dtype)).sum()
    return value.detach() + link - link.detach()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Logistic discriminator loss mean softplus(-D(x_real)) + mean softplus(D(sg x_gen)) (DMD2 §3.4). The caller
    builds `logits_fake` from a detached generator sample."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


@torch.no_grad()
def decoupled_dmd_direction(x: Tensor, x0_cond: Tensor, x0_uncond: Tensor, x0_fake: Tensor,
                            guidance: float | Tensor, w_cfg: float = 1.0, w_dm: float = 1.0,
                            eps_norm_min: float | None = 1e-4) -> Tensor:
    """Decoupled DMD (algorithms.md §7.1): with x0_real^w = x0_u + w (x0_c - x0_u) (Imagen convention, §0.5),

        x0_fake - x0_real^w = (x0_fake - x0_c)  +  (-(w - 1)(x0_c - x0_u))
                              \\_ DM term _/       \\_ CA (CFG-augmentation) term _/

        g = (w_dm * DM + w_cfg * CA) / mean_CHW|x - x0_real^w|.

    Sign convention: the same as `dmd_direction` (descend along -g: CA pushes x towards x0_c + (w-1)(x0_c - x0_u)).
    Normalisation: one DMD2 normaliser, built from the *guided* teacher x0_real^w, shared by both terms, so
    w_cfg = w_dm = 1 equals `dmd_direction(x, cfg(x0_u, x0_c, w), x0_fake)` and zeroing one weight leaves the other
    term unchanged. For separate re-noising draws (the paper's separate tau schedules) call this twice, once
    with w_dm = 0 and once with w_cfg = 0, and sum. `guidance` is a float or a [B] tensor; w = 1 kills CA.
    """
    xc, xu, xf = x0_cond.double(), x0_uncond.double(), x0_fake.double()
    w = bcast(torch.as_tensor(guidance, dtype=torch.float64), xc)
    x0_real = xu + w * (xc - xu)
    dm, ca = xf - xc, -(w - 1) * (xc - xu)
    g = (w_dm * dm + w_cfg * ca) / _dmd_normaliser(x, x0_real, eps_norm_min)
    return _finite(g).float()


def subinterval_noise(x_s: Tensor, s: Tensor | float, t: Tensor | float, schedule: Schedule,
                      generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """x_t = a sg(x_s) + b eps' (algorithms.md §4.2): diffuse an anchor at noise level s to t > s. If
    x_s = alpha_s x0 + sigma_s eps, then x_t = alpha_t x0 + sigma_t eps_tot with eps_tot ~ N(0, I). `noise` (eps')
    may be supplied (rank-synchronised draws); otherwise it is drawn on the CPU from `generator`."""
    if noise is None:
        noise = torch.randn(x_s.shape, generator=generator, dtype=torch.float32)
    return transition(x_s.detach(), s, t, schedule, noise)


def subinterval_target(x_t: Tensor, x_s: Tensor, s: Tensor | float, t: Tensor | float, schedule: Schedule,
                       kind: str = "flow") -> Tensor:
    """Fake-score regression target on a subinterval (Phased DMD, Fan et al. 2025; algorithms.md §4.2 [derived]).

    Denoising score matching with x_s as "data": grad log q(x_t|x_s) = -eps'/b, eps' = (x_t - a x_s)/b, mapped by
    Tweedie (x0 = (x_t + sigma_t^2 score)/alpha_t) to the x0-space target, written without 1/alpha_t:

        x0* = x_s / alpha_s - (alpha_t sigma_s^2 / (alpha_s^2 b)) eps',

    then to `kind` ("x0", "eps", "flow", "v") with `fewstep.diffusion.param.from_x0`. On RF, kind="flow" gives
    §4.2's v* = -x_s/(1-s) + [(t + (1-t) s^2/(1-s)^2) / b] eps' (LightX2V `phased_velocity_target`). Its least-
    squares regression on x_t is the marginal x0hat / velocity of the generator law; s = 0 gives x0* = x_s exactly.
    The eps' coefficient grows like 1/b as t -> s+: keep t a margin above s (§4.2). Returns float32.
    """
    a, b = transition_coeffs(s, t, schedule, x_t)
    (a_s, s_s), (a_t, s_t) = ((bcast(v.double(), x_t.double()) for v in schedule.alpha_sigma(
        torch.as_tensor(u, dtype=torch.float64, device=x_t.device))) for u in (s, t))
    eps = (x_t.double() - a * x_s.double()) / b
    x0 = x_s.double() / a_s.clamp_min(1e-12) - a_t * s_s**2 / (a_s.clamp_min(1e-12) ** 2 * b) * eps
    return from_x0(x0, x_t.double(), a_t, s_t, kind).float()


def naive_subinterval_target(x_t: Tensor, x_s: Tensor, t: Tensor | float, schedule: Schedule,
                             kind: str = "flow") -> Tensor:
    """The *wrong* target of algorithms.md §4.5: treat the noisy anchor x_s as clean (x0 target = x_s), i.e.
    eps' - x_s on RF when x_t = (1-t) x_s + t eps'. Kept only so tests can show it is biased (§4.6 test 2)."""
    a_t, s_t = (bcast(v.double(), x_t.double()) for v in schedule.alpha_sigma(
        torch.as_tensor(t, dtype=torch.float64, device=x_t.device)))
    return from_x0(x_s.double(), x_t.double(), a_t, s_t, kind).float()


def ambient_consistency(h_anchor: Tensor, h1: Tensor, h2: Tensor) -> Tensor:
    """AC-DMD's consistency regulariser on the fake score (RTDMD; algorithms.md §6.3): mean((h1 - a)(h2 - a)) for
    two independent samples h1, h2 of the fake's x0 after one CPS transition and its x0 `h_anchor` = a before it,
    an unbiased estimate of ||E[h | x_t] - a||^2 (the posterior mean is a martingale along its reverse process).
    Non-finite entries become 0, as in the official code."""
    return torch.nan_to_num((h1.float() - h_anchor.float()) * (h2.float() - h_anchor.float())).mean()


def capped_inverse_weight(b: Tensor, cap: float) -> Tensor:
    """RTDMD's "move_scale_out" weight of the subinterval fake-score loss: clamp(1/b^2, 0, cap) on b-scaled
    prediction and target equals min(1, cap b^2) on the plain ones (algorithms.md §6.7 test 2)."""
    return torch.clamp(cap * b.double() ** 2, max=1.0).float()
