"""The one trajectory loop (fewstep.sampling.rollout): the engine's result without gradients, gradients only
through the selected calls, and training rollouts that stop at a drawn step."""
import pytest
import torch
from torch import nn

from fewstep.diffusion.schedule import DiscreteVP, bcast
from fewstep.sampling.engine import sample
from fewstep.sampling.rollout import rollout
from fewstep.sampling.steps import ddim_step, renoise_step

SCHEDULE = DiscreteVP(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float())
TIMES = torch.tensor([0.999, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)


class Scaled(nn.Module):
    """x0 = w * x (a learnable scalar), recording whether each call ran with gradients on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.9))
        self.grad_on: list[bool] = []

    def forward(self, x, t, cond):
        self.grad_on.append(torch.is_grad_enabled())
        a, _ = (bcast(v, x) for v in SCHEDULE.alpha_sigma(t))
        return self.w * x / a


def reference_loop(denoiser, noise, times, step, generator):
    """The sampling loop written out once more, as the engine ran it before the rollout existed."""
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        tb, tb_next = t.expand(len(x)), t_next.expand(len(x))
        x = step(x, denoiser(x, tb, None), tb, tb_next, SCHEDULE, generator)
    return x


@pytest.mark.parametrize("step", [ddim_step, renoise_step], ids=["ddim", "renoise"])
def test_without_gradients_it_is_the_engines_loop_bitwise(step):
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    den = Scaled()
    with torch.no_grad():
        ref = reference_loop(den, noise, TIMES, step, torch.Generator().manual_seed(1))
        got = rollout(den, noise, TIMES, SCHEDULE, step=step, generator=torch.Generator().manual_seed(1),
                      grad="none").x
    assert torch.equal(got, ref)
    assert torch.equal(sample(den, noise, TIMES, SCHEDULE, step=step, generator=torch.Generator().manual_seed(1)),
                       ref)


def test_gradients_reach_only_the_selected_call():
    """Stopped at call 2 with grad="last": calls 0 and 1 run under no_grad, and d sum(x0) / dw is exactly the
    derivative through call 2 alone (its input treated as a constant)."""
    den, noise = Scaled(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = rollout(den, noise, TIMES, SCHEDULE, step=renoise_step, generator=torch.Generator().manual_seed(3),
                   until=2)
    assert den.grad_on == [False, False, True] and traj.index == 2
    assert not traj.x.requires_grad and traj.x0.requires_grad
    traj.x0.sum().backward()
    a, _ = (bcast(v, traj.x) for v in SCHEDULE.alpha_sigma(TIMES[2].expand(2)))
    torch.testing.assert_close(den.w.grad, (traj.x / a).sum(), rtol=1e-6, atol=1e-6)


def test_selected_calls_and_no_grad_context():
    den, noise = Scaled(), torch.randn(1, 4, 8, 8)
    rollout(den, noise, TIMES, SCHEDULE, grad={0, 3})
    assert den.grad_on == [True, False, False, True]
    den.grad_on.clear()
    with torch.no_grad():   # a caller's no_grad wins over any selection
        rollout(den, noise, TIMES, SCHEDULE, grad="all")
    assert den.grad_on == [False] * 4
    with pytest.raises(ValueError, match="outside"):
        rollout(den, noise, TIMES, SCHEDULE, until=5)
