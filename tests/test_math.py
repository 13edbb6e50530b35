"""Schedules, parameterisation conversions and CFG conventions (algorithms.md §0.2-0.5)."""
import pytest
import torch
from diffusers import DDPMScheduler

from fewstep.diffusion.param import PREDICTIONS, cfg, from_x0, to_x0
from fewstep.diffusion.schedule import (DiscreteVP, RectifiedFlow, bcast, dynamic_shift, flux_mu,
                                        static_shift)


def sd_table():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def test_discrete_vp_matches_table_at_integer_indices():
    ab = sd_table()
    vp = DiscreteVP(ab)
    idx = torch.tensor([0, 1, 250, 749, 999])
    a, s = vp.alpha_sigma(vp.to_t(idx))
    torch.testing.assert_close(a, ab[idx].sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s, (1 - ab[idx]).sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(vp.model_timestep(vp.to_t(idx)), idx.float())


def test_discrete_vp_memo_gives_fresh_copies_of_the_exact_values():
    """CPU alpha_sigma is memoised by time values: same numbers as the uncached path, and a caller's in-place edit
    of a result does not reach the next caller."""
    vp = DiscreteVP(sd_table())
    t = torch.tensor([0.5, 0.5, 0.37])
    a, s = vp.alpha_sigma(t)
    ref_a, ref_s = vp._alpha_sigma(t)
    assert torch.equal(a, ref_a) and torch.equal(s, ref_s)
    a.mul_(0)
    again, _ = vp.alpha_sigma(t.clone())
    assert torch.equal(again, ref_a)
    assert len(vp._memo) == 1                               # one entry for the two equal-valued tensors


def test_discrete_vp_is_monotone_and_variance_preserving():
    vp = DiscreteVP(sd_table())
    t = torch.linspace(0, 1, 301)
    a, s = vp.alpha_sigma(t)
    assert (a[1:] < a[:-1]).all() and (s[1:] > s[:-1]).all()
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), atol=1e-6, rtol=0)


def test_rectified_flow_and_shifts():
    rf = RectifiedFlow()
    t = torch.tensor([0.0, 0.25, 1.0])
    a, s = rf.alpha_sigma(t)
    torch.testing.assert_close(a + s, torch.ones(3))
    torch.testing.assert_close(static_shift(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    assert static_shift(torch.tensor([1.0]), 3.0).item() == 1.0
    mu = flux_mu(256)
    assert abs(mu - 0.5) < 1e-9 and abs(flux_mu(4096) - 1.15) < 1e-9
    out = dynamic_shift(torch.tensor([0.0, 0.5, 1.0]), mu)
    assert out[0] == 0 and abs(out[2].item() - 1) < 1e-6 and out[1] > 0.5


@pytest.mark.parametrize("sched,kinds", [(DiscreteVP(sd_table()), ("eps", "v", "x0")),
                                         (RectifiedFlow(), ("eps", "flow", "x0"))])
def test_conversions_invert(sched, kinds):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    a, s = (bcast(v, x0) for v in sched.alpha_sigma(t))
    x_t = a * x0 + s * eps
    for kind in kinds:
        out = from_x0(x0, x_t, a, s, kind)
        torch.testing.assert_close(to_x0(out, x_t, a, s, kind), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_x0(x0, x_t, a, s, "eps"), eps, atol=1e-4, rtol=1e-4)
    if sched.kind == "flow":
        torch.testing.assert_close(from_x0(x0, x_t, a, s, "flow"), eps - x0, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(from_x0(x0, x_t, a, s, "v"), a * eps - s * x0, atol=1e-4, rtol=1e-4)


def test_unknown_prediction_kind_raises():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown prediction"):
        to_x0(x, x, x, x, "score")
    assert set(PREDICTIONS) == {"eps", "v", "flow", "x0"}


@pytest.mark.parametrize("sched,kinds", [(DiscreteVP(sd_table()), ("eps", "v")), (RectifiedFlow(), ("eps", "flow"))])
def test_cfg_is_the_same_in_every_parameterisation(sched, kinds):
    """CFG on eps, v or flow outputs equals CFG on x0 (the conversions are affine at fixed x_t, t; §0.5)."""
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    a, s = (bcast(v, x_t) for v in sched.alpha_sigma(t))
    x0_u, x0_c = torch.randn(2, 3, 2, 4, 4, generator=g)
    ref = cfg(x0_u, x0_c, 3.5)
    for kind in kinds:
        out_u, out_c = from_x0(x0_u, x_t, a, s, kind), from_x0(x0_c, x_t, a, s, kind)
        torch.testing.assert_close(to_x0(cfg(out_u, out_c, 3.5), x_t, a, s, kind), ref, atol=1e-4, rtol=1e-4)
    # LCM form c + omega (c - u) with omega = w - 1 is the same guidance
    torch.testing.assert_close(x0_c + 2.5 * (x0_c - x0_u), ref)
