"""RTDMD stage 2's bookkeeping (algorithms.md §6.7 test 5): the CPS log-prob and PPO ratio on the deterministic last
step, the clipped surrogate by hand, per-prompt standardisation with the global std, shared noise within a prompt
group, the same step choice everywhere, and zero-advantage filtering that keeps batches divisible."""
import torch
import pytest

from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import RectifiedFlow
from fewstep.recipes.grpo import (group_advantages, keep_nonzero, ppo_loss, prompt_seed, select_steps, shared_noise,
                                  weighted_advantages)
from fewstep.sampling.steps import cps_log_prob, cps_mean_std


def test_last_step_has_zero_log_prob_and_ratio_one():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.full((4,), 0.25)
    x_t = diffuse(x0, t, RectifiedFlow(), eps)
    mean, rho = cps_mean_std(x_t, x0, t, torch.zeros(4), RectifiedFlow(), 0.9)
    lp = cps_log_prob(mean, mean)
    assert torch.equal(lp, torch.zeros(4)) and float(rho.abs().max()) == 0
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss = ppo_loss(lp.requires_grad_(), lp.detach(), adv)
    assert float(loss.detach()) == pytest.approx(float(-adv.mean()))   # ratio exactly 1


def test_clipped_surrogate_by_hand():
    logp_new = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    logp_old = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0]) / torch.tensor([1.2, 0.7, 1.2, 0.7]))   # r = 1.2, .7, ..
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss = ppo_loss(logp_new, logp_old, adv, clip_range=0.1)
    # max(-A r, -A clip(r)): A>0, r=1.2 -> max(-1.2, -1.1) = -1.1; A>0, r=.7 -> max(-.7, -.9) = -.7
    #                        A<0, r=1.2 -> max(1.2, 1.1) = 1.2;    A<0, r=.7 -> max(.7, .9) = .9
    assert float(loss.detach()) == pytest.approx((-1.1 - 0.7 + 1.2 + 0.9) / 4, rel=1e-5)
    loss.backward()
    # clipped terms pass no gradient: only samples 1 and 2 (unclipped) move
    assert logp_new.grad[0] == 0 and logp_new.grad[3] == 0 and logp_new.grad[1] != 0 and logp_new.grad[2] != 0


def test_per_prompt_advantages_use_the_global_std():
    r = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = ["a", "a", "b", "b"]
    adv = group_advantages(r, groups)
    want = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (r.std() + 1e-4)
    torch.testing.assert_close(adv, want)
    assert torch.equal(group_advantages(r, torch.tensor([7, 7, 9, 9])), adv)     # integer ids, same result
    assert float(group_advantages(r * 100, groups).abs().max()) <= 5.0            # clipped
    clipped = group_advantages(torch.tensor([0.0, 100.0, 0.0, 0.0]), groups, clip=0.5)   # +-50 / std 50 -> +-1
    assert clipped.tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])
    assert torch.equal(group_advantages(torch.tensor([2.0, 5.0]), ["a", "b"]), torch.zeros(2))   # singletons: 0
    total = weighted_advantages({"x": r, "y": r}, {"x": 2.0, "y": 1.0}, groups)       # 3 x the same advantages,
    a = group_advantages(r, groups, clip=float("inf")).double()                      # standardised over the batch
    torch.testing.assert_close(total, ((a - a.mean()) / (a.std() + 1e-4)).float(), rtol=1e-3, atol=1e-3)  # eps/std apart


def test_shared_noise_within_groups_and_distinct_across_steps():
    prompts = ["a cat", "a dog", "a cat"]
    n0 = shared_noise(prompts, (2, 3), step=0, epoch_seed=5)
    assert torch.equal(n0[0], n0[2]) and not torch.equal(n0[0], n0[1])
    assert not torch.equal(n0, shared_noise(prompts, (2, 3), step=1, epoch_seed=5))
    assert not torch.equal(n0, shared_noise(prompts, (2, 3), step=0, epoch_seed=6))
    assert prompt_seed("a cat", 2, 0) - prompt_seed("a cat", 1, 0) == 10007


def test_step_selection_is_seeded_and_in_range():
    picks = [select_steps(seed=3, epoch=e, first=0, last=2, k=2) for e in range(20)]
    assert all(len(set(p)) == 2 and set(p) <= {0, 1, 2} and p == sorted(p) for p in picks)
    assert picks == [select_steps(seed=3, epoch=e, first=0, last=2, k=2) for e in range(20)]   # any process agrees
    assert len({tuple(p) for p in picks}) > 1
    with pytest.raises(ValueError):
        select_steps(0, 0, 0, 2, 4)


@pytest.mark.parametrize("adv, multiple, kept", [
    ([1.0, 0.0, -1.0, 0.0, 2.0, 0.0], 2, [0, 2, 4, 1]),      # 3 non-zero, padded with one zero-advantage sample
    ([1.0, 2.0, 3.0], 2, [0, 1]),                             # no zero to pad with: truncated to a multiple
    ([0.0, 0.0], 2, []),
    ([1.0, 1.0, 0.0, 0.0], 4, [0, 1, 2, 3]),
])
def test_zero_advantage_filter_keeps_batches_divisible(adv, multiple, kept):
    got = keep_nonzero(torch.tensor(adv), multiple)
    assert got.tolist() == kept and len(got) % multiple == 0
