"""RTDMD stage 2's policy-gradient bookkeeping (SubGRPO; algorithms.md §6.4, §6.7 test 5), as pure functions the
`rtdmd` recipe composes: which rollout steps are trained, the prompt-group noise shared at the other steps,
per-prompt advantages with the global std, the zero-advantage filter that keeps batches divisible, and the
clipped PPO surrogate on CPS log-probabilities (`fewstep.sampling.steps.cps_log_prob`). Every choice is a function
of (seed, epoch, prompt, step) or of gathered values, so all processes agree without broadcasting."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

from fewstep.sampling.draws import key_seed

SHARED_NOISE_STRIDE = 10007   # the official per-step offset of the prompt-seeded noise


def select_steps(seed: int, epoch: int, first: int, last: int, k: int) -> list[int]:
    """k distinct stochastic steps from first..last (inclusive) for this epoch, the same on every process (the
    official `num_train_steps` of `range_start`..`range_end`); sorted."""
    if not 0 <= first <= last or not 0 < k <= last - first + 1:
        raise ValueError(f"cannot pick {k} steps from {first}..{last}")
    g = torch.Generator().manual_seed(key_seed(seed, epoch))
    pick = torch.randperm(last - first + 1, generator=g)[:k] + first
    return sorted(int(i) for i in pick)


def prompt_seed(prompt: str, step: int, epoch_seed: int) -> int:
    """The seed of a prompt group's shared noise at a non-selected step: SHA-256 of the prompt, plus 10007 x step,
    plus the epoch's seed (official GRPO sampler), reduced to 63 bits."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return (digest + SHARED_NOISE_STRIDE * step + epoch_seed) % (2**63)


def shared_noise(prompts: Sequence[str], shape: Sequence[int], step: int, epoch_seed: int) -> Tensor:
    """[len(prompts), *shape] noise, identical for identical prompts (one CPU generator per row, seeded by
    `prompt_seed`): within-group reward differences then come from the selected steps and the initial noise."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(
        prompt_seed(p, step, epoch_seed))) for p in prompts])


def group_advantages(rewards: Tensor, groups: Sequence[str] | Tensor, clip: float = 5.0, eps: float = 1e-4) -> Tensor:
    """Per-prompt advantages (official `per_prompt_global_std`): each reward minus its prompt group's mean, divided
    by the std of all rewards (+ eps), then clipped to +-clip. `rewards` [N] must be the gathered global batch so
    every process computes the same values. Groups are prompt strings or integer ids."""
    r = rewards.double()
    if isinstance(groups, Tensor):
        _, inverse = torch.unique(groups, return_inverse=True)
    else:
        first: dict[str, int] = {}
        inverse = torch.tensor([first.setdefault(g, len(first)) for g in groups])
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, r)
    counts = torch.bincount(inverse).double()
    centred = r - (sums / counts)[inverse]
    return (centred / (r.std() + eps)).clamp(-clip, clip).float()


def weighted_advantages(per_reward: dict[str, Tensor], weights: dict[str, float], groups: Sequence[str] | Tensor,
                        clip: float = 5.0, eps: float = 1e-4) -> Tensor:
    """Several rewards (official SD3.5-M: clipscore, hpsv2, pickscore, geneval, weight 1 each): each normalised per
    prompt with the global std, weighted and summed, then standardised over the batch and clipped to +-clip."""
    total = sum(weights[name] * group_advantages(r, groups, clip=float("inf"), eps=eps).double()
                for name, r in per_reward.items())
    return ((total - total.mean()) / (total.std() + eps)).clamp(-clip, clip).float()


def keep_nonzero(advantages: Tensor, multiple: int) -> Tensor:
    """Indices of the samples to train on: those with a non-zero advantage, padded with zero-advantage ones (which
    contribute no gradient) up to a multiple of `multiple`, so every micro-batch is full. Deterministic."""
    nonzero = torch.nonzero(advantages != 0).flatten()
    zero = torch.nonzero(advantages == 0).flatten()
    need = min((-len(nonzero)) % multiple, len(zero))
    kept = torch.cat([nonzero, zero[:need]])
    return kept[: len(kept) - len(kept) % multiple] if len(kept) % multiple else kept


def ppo_terms(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float = 1e-5) -> Tensor:
    """Per-sample clipped PPO surrogate max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(logp_new - logp_old) (Schulman
    et al. 2017, Eq. 7; algorithms.md §6.4). With CPS's unnormalised log-probability the ratios stay within about
    1 +- 1e-5, which the official clip range of 1e-5 is tuned to."""
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = advantages.detach()
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))


def ppo_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float = 1e-5) -> Tensor:
    """The batch mean of `ppo_terms`."""
    return ppo_terms(logp_new, logp_old, advantages, clip_range).mean()


def group_leaders(n: int, group_size: int) -> Tensor:
    """Row i of a batch takes the prompt of row (i // K) K: consecutive groups of K rows share a prompt. Batches
    are a multiple of K on every process, so groups never straddle processes and stay the same for any split."""
    if n % group_size:
        raise ValueError(f"a batch of {n} is not a multiple of the group size {group_size}")
    return torch.arange(n) // group_size * group_size


def local_advantages(rewards: Tensor, group_size: int, global_std: float, clip: float = 5.0,
                     eps: float = 1e-4) -> Tensor:
    """`group_advantages` for a process's own rows when its groups are whole (`group_leaders`): the group means
    are local and only the std is global (gathered by the caller)."""
    r = rewards.double().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (global_std + eps)).clamp(-clip, clip).flatten().float()
