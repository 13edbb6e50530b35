"""The DMD family's math on analytic teachers (algorithms.md §0.6-0.7, §2.6, §3.9, §4.6, §7.1; CPU, seeded).

Every test compares against an independent closed form or a Monte-Carlo estimate with a stated tolerance, so a sign,
weighting or normalisation slip fails it.
"""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from fewstep.data.toy import (GaussianDenoiser, GaussianMixtureDenoiser, mode_coverage, ring_means,
                              sample_mixture)
from fewstep.diffusion.forward import transition_coeffs as subinterval_coeffs
from fewstep.diffusion.param import cfg, from_x0
from fewstep.diffusion.schedule import DiscreteVP, RectifiedFlow, bcast
from fewstep.recipes.losses import (critic_denoising_loss, decoupled_dmd_direction, denoising_weight,
                                    dmd_direction, dmd_loss, eps_mse_loss, gan_discriminator_loss,
                                    gan_generator_loss, naive_subinterval_target, regression_loss,
                                    subinterval_noise, subinterval_target)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def sd_vp() -> DiscreteVP:
    return DiscreteVP(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod)


SCHEDULES = {"vp": sd_vp, "rf": RectifiedFlow}


def noised(x, t, sched, gen):
    a, b = (bcast(v, x) for v in sched.alpha_sigma(t))
    return a * x + b * torch.randn(x.shape, generator=gen, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------- analytic teachers

@pytest.mark.parametrize("kind", ["vp", "rf"])
def test_mixture_denoiser_satisfies_tweedie(kind):
    """x0hat = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with grad log p_t by autograd of the mixture density."""
    sched, gen = SCHEDULES[kind](), torch.Generator().manual_seed(0)
    means, std = ring_means(5, 1.5).double(), torch.tensor([0.2, 0.3, 0.25, 0.1, 0.4])
    weights = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64) * 2
    t = torch.rand(64, generator=gen) * 0.9 + 0.05
    a, b = (v.double()[:, None] for v in sched.alpha_sigma(t))                     # [B, 1]
    var = a**2 * std.double() ** 2 + b**2                                         # [B, K]
    x.requires_grad_(True)
    comp = -((x[:, None] - a[:, :, None] * means) ** 2).sum(-1) / (2 * var) - var.log()   # D = 2: -D/2 log var
    logp = torch.logsumexp(comp + (weights / weights.sum()).log(), -1).sum()
    score, = torch.autograd.grad(logp, x)
    den = GaussianMixtureDenoiser(means, std, sched, weights)
    torch.testing.assert_close(den(x.detach(), t), (x.detach() + b**2 * score) / a, rtol=1e-9, atol=1e-9)
    one = GaussianMixtureDenoiser(means[:1], 0.3, sched)                          # K = 1 is the Gaussian formula
    torch.testing.assert_close(one(x.detach(), t), GaussianDenoiser(means[0], 0.09, sched)(x.detach(), t))


def test_mode_coverage_separates_modes_from_a_ring():
    """The metric's power: exact mixture samples score 1 - e^-4.5 = 98.9 %; an angularly uniform ring of the same
    radius and radial spread scores ~54 % (below the 70 % bar), so the student test cannot pass with a ring."""
    gen, means, std = torch.Generator().manual_seed(0), ring_means(8, 2.0), 0.15
    share, per_mode = mode_coverage(sample_mixture(means, std, 40_000, gen), means, std)
    assert abs(share - (1 - math.exp(-4.5))) < 0.005 and (per_mode * 8 - 1).abs().max() < 0.1
    angle, radius = torch.rand(40_000, generator=gen) * 2 * math.pi, 2 + std * torch.randn(40_000, generator=gen)
    ring_share, _ = mode_coverage(torch.stack([radius * angle.cos(), radius * angle.sin()], 1), means, std)
    assert 0.45 < ring_share < 0.62


# ------------------------------------------------------------------------------------------------- DMD direction

@pytest.mark.parametrize("kind", ["vp", "rf"])
def test_dmd_direction_is_weighted_score_difference(kind):
    """§0.6: with w_t = (sigma^2/alpha) CHW / ||x - x0_real||_1, w_t (s_fake - s_real) = g, for Gaussian real and
    fake laws where both scores are closed-form (§0.7), on SD's DDPM table and on rectified flow."""
    sched, gen = SCHEDULES[kind](), torch.Generator().manual_seed(1)
    shape = (2, 3, 3)
    mu_r, var_r = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) + 0.2
    mu_f, var_f = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) + 0.2
    x = mu_f + var_f.sqrt() * torch.randn((6, *shape), generator=gen)             # generator samples [6, 2, 3, 3]
    t = torch.rand(6, generator=gen) * 0.96 + 0.02
    x_t = noised(x, t, sched, gen)
    g = dmd_direction(x, GaussianDenoiser(mu_r, var_r, sched)(x_t, t), GaussianDenoiser(mu_f, var_f, sched)(x_t, t))
    a, b = (bcast(v.double(), x.double()) for v in sched.alpha_sigma(t))
    s_real = -(x_t.double() - a * mu_r) / (a**2 * var_r + b**2)                   # §0.7 scores, float64
    s_fake = -(x_t.double() - a * mu_f) / (a**2 * var_f + b**2)
    x0_real = (x_t.double() + b**2 * s_real) / a                                  # Tweedie
    w_t = b**2 / a * x[0].numel() / (x.double() - x0_real).abs().sum((1, 2, 3), keepdim=True)
    assert g.dtype == torch.float32 and not g.requires_grad
    torch.testing.assert_close(g.double(), w_t * (s_fake - s_real), rtol=2e-4, atol=1e-5)


def test_dmd_loss_gradient_is_g_over_numel():
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(4, 3, 5, 5, generator=gen, requires_grad=True)
    x = 2 * theta + 1                                                            # a graph between params and x
    g = torch.randn(4, 3, 5, 5, generator=gen)
    loss = dmd_loss(x, g)
    loss.backward()
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    torch.testing.assert_close(theta.grad, 2 * g / g.numel())


@pytest.mark.parametrize("kind", ["vp", "rf"])
def test_gaussian_generator_converges_with_exact_fake_score(kind):
    """§2.6(3): x = m + s z against N(mu, std^2) with the exact fake score GaussianDenoiser(m, s^2) each step.
    Tolerance 1e-3: with an exact fake score g vanishes identically at the target (x0_fake == x0_real for every
    x_t), so there is no gradient-noise floor; 300 cosine-decayed Adam steps reach < 1e-5 (observed), and a sign
    error diverges instead."""
    sched, gen = SCHEDULES[kind](), torch.Generator().manual_seed(3)
    mu, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.2])
    real = GaussianDenoiser(mu, std**2, sched)
    m, s = torch.zeros(2, requires_grad=True), torch.full((2,), 1.5, requires_grad=True)
    opt = torch.optim.Adam([m, s], lr=0.05)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        x = m + s * torch.randn(128, 2, generator=gen)
        with torch.no_grad():
            t = torch.rand(128, generator=gen) * 0.96 + 0.02                     # DMD's [0.02, 0.98] range
            x_t = noised(x, t, sched, gen)
            g = dmd_direction(x, real(x_t, t), GaussianDenoiser(m, s**2, sched)(x_t, t))
        opt.zero_grad()
        dmd_loss(x, g).backward()
        opt.step()
        decay.step()
    torch.testing.assert_close(m.detach(), mu, atol=1e-3, rtol=0)
    torch.testing.assert_close(s.detach().abs(), std, atol=1e-3, rtol=0)


# The DMD2 ring test that drives the real recipe class lives in tests/test_recipes_analytic.py.


# ------------------------------------------------------------------------------------------ guards and GAN terms

def test_nan_guard_on_zero_normaliser():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    x0_real, x0_fake = x.clone(), x + torch.randn(3, 2, 4, 4, generator=gen)
    x0_real[1] += 1.0                                                             # sample 1 has a normal normaliser
    x0_fake[2] = x[2]                                                             # sample 2: 0 / 0
    unclamped = dmd_direction(x, x0_real, x0_fake, eps_norm_min=None)            # DMD2: nan_to_num only
    clamped = dmd_direction(x, x0_real, x0_fake)                                  # LightX2V: clamp at 1e-4
    assert torch.isfinite(unclamped).all() and torch.isfinite(clamped).all()
    assert (unclamped[0] == 0).all() and (unclamped[2] == 0).all()
    torch.testing.assert_close(clamped[0], (x0_fake[0] - x0_real[0]) / 1e-4)
    torch.testing.assert_close(unclamped[1], clamped[1])                          # per-sample: others untouched
    torch.testing.assert_close(unclamped[1], (x0_fake[1] - x0_real[1]) / (x[1] - x0_real[1]).abs().mean())
    x0_fake[0, 0, 0, 0] = float("nan")
    assert torch.isfinite(dmd_direction(x, x0_real, x0_fake)).all()


def test_gan_losses():
    zero = torch.zeros(5, requires_grad=True)
    torch.testing.assert_close(gan_generator_loss(zero), torch.tensor(math.log(2)))
    real, fake = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    d_loss = gan_discriminator_loss(real, fake)
    torch.testing.assert_close(d_loss, torch.tensor(2 * math.log(2)))
    d_loss.backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()                      # D raises real, lowers fake logits
    gan_generator_loss(zero).backward()
    assert (zero.grad < 0).all()                                                 # G raises its fake logits
    logits = torch.randn(7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gan_generator_loss(logits), -torch.sigmoid(logits).log().mean())


def test_critic_loss_spaces_are_reweightings_of_x0_mse():
    """||eps_hat - eps||^2 = (alpha/sigma)^2 ||x0_hat - x0||^2, and likewise for flow and v targets (§0.2-0.3)."""
    gen = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(5, 2, 3, 3, generator=gen), torch.randn(5, 2, 3, 3, generator=gen)
    x0_hat = x0 + 0.3 * torch.randn(5, 2, 3, 3, generator=gen)
    t = torch.rand(5, generator=gen) * 0.9 + 0.05
    for sched, space, kind in [(sd_vp(), "eps", "eps"), (sd_vp(), "v", "v"), (RectifiedFlow(), "flow", "flow")]:
        a, s = (bcast(v, x0) for v in sched.alpha_sigma(t))
        x_t = a * x0 + s * noise
        pred, target = (from_x0(y, x_t, a, s, kind) for y in (x0_hat, x0))
        per_sample = ((pred - target) ** 2).mean((1, 2, 3))
        torch.testing.assert_close(critic_denoising_loss(x0_hat, x0, denoising_weight(t, sched, space)),
                                   per_sample.mean(), rtol=1e-4, atol=1e-6)
        if space == "eps":
            torch.testing.assert_close(eps_mse_loss(pred, noise), per_sample.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(critic_denoising_loss(x0_hat, x0), ((x0_hat - x0) ** 2).mean())
    torch.testing.assert_close(regression_loss(x0_hat, x0), ((x0_hat - x0) ** 2).mean())
    huber = (((x0_hat - x0) ** 2 + 0.01**2).sqrt() - 0.01).mean()                 # ~ |d| for |d| >> c
    torch.testing.assert_close(regression_loss(x0_hat, x0, "huber", 0.01), huber)
    with pytest.raises(ValueError, match="LPIPS"):
        regression_loss(x0_hat, x0, "lpips")


# ------------------------------------------------------------------------------------------------ decoupled DMD

def test_decoupled_direction_splits_dmd_exactly():
    """§7.1: DM term + CA term with unit weights is DMD against the CFG teacher; each weight switches its term."""
    sched, gen = RectifiedFlow(), torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 4, 4, generator=gen)
    t = torch.rand(4, generator=gen) * 0.9 + 0.05
    x_t = noised(x, t, sched, gen)
    x0_c, x0_u, x0_f = (GaussianDenoiser(torch.randn(2, 4, 4, generator=gen), 0.5, sched)(x_t, t) for _ in range(3))
    w = torch.tensor([1.0, 2.5, 4.0, 7.5])                                        # per-sample guidance, 1 = off
    full = dmd_direction(x, cfg(x0_u, x0_c, bcast(w, x)), x0_f)
    torch.testing.assert_close(decoupled_dmd_direction(x, x0_c, x0_u, x0_f, w, 1.0, 1.0), full)
    norm = (x - cfg(x0_u, x0_c, bcast(w, x))).abs().mean((1, 2, 3), keepdim=True)
    dm = decoupled_dmd_direction(x, x0_c, x0_u, x0_f, w, w_cfg=0.0, w_dm=1.0)
    ca = decoupled_dmd_direction(x, x0_c, x0_u, x0_f, w, w_cfg=1.0, w_dm=0.0)
    torch.testing.assert_close(dm, (x0_f - x0_c) / norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca, -(bcast(w, x) - 1) * (x0_c - x0_u) / norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dm + ca, full, rtol=1e-5, atol=1e-6)
    assert (ca[0] == 0).all() and (ca[1:].abs().amax((1, 2, 3)) > 0.1).all()      # w = 1 kills CA
    torch.testing.assert_close(decoupled_dmd_direction(x, x0_c, x0_u, x0_f, 3.0, 0.5, 2.0),
                               0.5 * decoupled_dmd_direction(x, x0_c, x0_u, x0_f, 3.0, 1.0, 0.0)
                               + 2.0 * decoupled_dmd_direction(x, x0_c, x0_u, x0_f, 3.0, 0.0, 1.0))


# -------------------------------------------------------------------------------------------------- Phased DMD

@pytest.mark.parametrize("kind", ["vp", "rf"])
def test_subinterval_kernel_is_consistent_with_the_path(kind):
    """§4.6(3): two-stage noising x0 -> x_s -> x_t has the one-stage law N(alpha_t mu, alpha_t^2 S + sigma_t^2);
    a -> 1 and b -> 0 as t -> s. Moments to 5 standard errors at N = 400k."""
    sched, gen, n = SCHEDULES[kind](), torch.Generator().manual_seed(8), 400_000
    mu, var, s, t = 1.0, 0.25, 0.4, 0.7
    x0 = mu + math.sqrt(var) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x_s = noised(x0, torch.full((n,), s), sched, gen)
    x_t = subinterval_noise(x_s, s, t, sched, gen)
    (a_t, s_t), = [tuple(v.item() for v in sched.alpha_sigma(torch.tensor(t)))]
    m_ref, v_ref = a_t * mu, a_t**2 * var + s_t**2
    assert abs(x_t.mean().item() - m_ref) < 5 * math.sqrt(v_ref / n)
    assert abs(x_t.var().item() - v_ref) < 5 * v_ref * math.sqrt(2 / n)
    a, b = subinterval_coeffs(torch.tensor(s), torch.tensor(s + 1e-6), sched, x_s)
    assert abs(a.item() - 1) < 1e-4 and b.item() < 1e-2


def test_subinterval_target_closed_forms():
    """§4.2: on RF the flow target is -x_s/(1-s) + [(t + (1-t)s^2/(1-s)^2)/b] eps'; s = 0 gives eps' - x0 (flow)
    and x0 itself (x0 space) exactly (§4.6(4))."""
    sched, gen = RectifiedFlow(), torch.Generator().manual_seed(9)
    x_s, eps = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    s, t = torch.rand(6, generator=gen) * 0.5, torch.rand(6, generator=gen) * 0.4 + 0.55
    x_t = subinterval_noise(x_s, s, t, sched, noise=eps)
    s_, t_ = bcast(s, x_s), bcast(t, x_s)
    b = (t_**2 - ((1 - t_) / (1 - s_)) ** 2 * s_**2).sqrt()
    ref = -x_s / (1 - s_) + (t_ + (1 - t_) * s_**2 / (1 - s_) ** 2) / b * eps
    torch.testing.assert_close(subinterval_target(x_t, x_s, s, t, sched, "flow"), ref, rtol=1e-5, atol=1e-5)
    x_t0 = subinterval_noise(x_s, 0.0, t, sched, noise=eps)
    torch.testing.assert_close(subinterval_target(x_t0, x_s, 0.0, t, sched, "flow"), eps - x_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subinterval_target(x_t0, x_s, 0.0, t, sched, "x0"), x_s, rtol=1e-5, atol=1e-5)


def _affine_fit(x, y):
    """Least-squares y ≈ slope x + intercept, with the slope's standard error."""
    xc = x - x.mean()
    slope = (xc * (y - y.mean())).sum() / (xc**2).sum()
    intercept = y.mean() - slope * x.mean()
    resid = y - slope * x - intercept
    return slope.item(), intercept.item(), (resid.std() / (xc.std() * math.sqrt(len(x)))).item()


@pytest.mark.parametrize("kind,space", [("rf", "flow"), ("vp", "x0")])
def test_subinterval_target_regresses_to_the_marginal_denoiser(kind, space):
    """§4.6(1-2): with x_s = forward-noised Gaussian data, the least-squares regression of the subinterval target on
    x_t is the analytic marginal velocity (RF) / x0hat (VP) of GaussianDenoiser at t (it is affine, the law being
    Gaussian); the naive target (x_s treated as clean) is off by many standard errors. N = 1M, 5 SE and 1e-2."""
    sched, gen, n = SCHEDULES[kind](), torch.Generator().manual_seed(10), 1_000_000
    mu, var, s, t = 1.0, 0.25, 0.4, 0.7
    x0 = mu + math.sqrt(var) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x_s = noised(x0, torch.full((n,), s), sched, gen).float()
    x_t = subinterval_noise(x_s, s, t, sched, gen)
    tt = torch.full((n,), t)
    analytic = GaussianDenoiser(mu, var, sched)
    a_t, s_t = (bcast(v, x_t) for v in sched.alpha_sigma(tt[:2]))
    probe = torch.tensor([[0.0], [1.0]])                                          # exact affine map at 2 points
    ref = from_x0(analytic(probe, tt[:2]), probe, a_t, s_t, space).double().flatten()
    ref_slope, ref_intercept = (ref[1] - ref[0]).item(), ref[0].item()
    slope, intercept, se = _affine_fit(x_t.double().flatten(), subinterval_target(x_t, x_s, s, t, sched, space)
                                       .double().flatten())
    assert abs(slope - ref_slope) < min(5 * se, 1e-2) + 1e-4, (slope, ref_slope, se)
    assert abs(intercept - ref_intercept) < 1e-2, (intercept, ref_intercept)
    naive_slope, _, naive_se = _affine_fit(x_t.double().flatten(), naive_subinterval_target(x_t, x_s, t, sched, space)
                                           .double().flatten())
    assert abs(naive_slope - ref_slope) > 20 * naive_se + 0.02, (naive_slope, ref_slope)


def test_through_passes_the_gradient_to_the_input_and_none_into_the_function():
    """The generator's GAN term: d fn(x) / dx reaches x exactly, fn's parameters get no gradient, and the value is
    fn(x)."""
    from fewstep.recipes.losses import through

    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    w = torch.randn(5, 3, requires_grad=True)
    x = w * 2.0
    value = through(lambda v: disc(v).square().mean(), x)
    value.backward()
    assert all(p.grad is None for p in disc.parameters())
    w2 = w.detach().clone().requires_grad_(True)
    direct = disc(w2 * 2.0).square().mean()
    direct.backward()
    torch.testing.assert_close(value.detach(), direct.detach())
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad.abs().max() > 0
