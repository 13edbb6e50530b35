"""The forward process in one place (fewstep.diffusion.forward): noising to t and the exact transition s -> t."""
import pytest
import torch

from fewstep.diffusion.forward import diffuse, transition, transition_coeffs
from fewstep.diffusion.schedule import DiscreteVP, RectifiedFlow, bcast


def schedules():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return [DiscreteVP(torch.cumprod(1 - betas, 0).float()), RectifiedFlow()]


@pytest.mark.parametrize("schedule", schedules(), ids=["vp", "flow"])
def test_diffuse_is_alpha_x0_plus_sigma_noise(schedule):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    a, s = (bcast(v, x0) for v in schedule.alpha_sigma(t))
    assert torch.equal(diffuse(x0, t, schedule, noise), a * x0 + s * noise)


@pytest.mark.parametrize("schedule", schedules(), ids=["vp", "flow"])
def test_transition_composes_to_the_marginal(schedule):
    """q(x_t | x_s) after q(x_s | x0) is q(x_t | x0): the x0 coefficient is alpha_t and the total noise variance
    a^2 sigma_s^2 + b^2 is sigma_t^2 (algorithms.md §0.2)."""
    like = torch.zeros(2, 1)
    s, t = torch.tensor([0.2, 0.4], dtype=torch.float64), torch.tensor([0.6, 0.95], dtype=torch.float64)
    a, b = transition_coeffs(s, t, schedule, like)
    (a_s, s_s), (a_t, s_t) = ((bcast(v.double(), like.double()) for v in schedule.alpha_sigma(u)) for u in (s, t))
    torch.testing.assert_close(a * a_s, a_t, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a**2 * s_s**2 + b**2, s_t**2, rtol=1e-6, atol=1e-9)


def test_transition_samples_have_the_marginal_statistics():
    """Empirically: x0 = 1, x_s ~ q(x_s | x0), then x_t = transition(x_s): mean alpha_t, std sigma_t."""
    schedule, gen = RectifiedFlow(), torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.ones(n, 1)
    s, t = torch.full((n,), 0.3), torch.full((n,), 0.7)
    x_s = diffuse(x0, s, schedule, torch.randn(n, 1, generator=gen))
    x_t = transition(x_s, s, t, schedule, torch.randn(n, 1, generator=gen))
    assert abs(float(x_t.mean()) - 0.3) < 0.01 and abs(float(x_t.std()) - 0.7) < 0.01
