"""Exact draws from a reward-tilted distribution p(x) exp(r(x) / beta) (RTDMD's target, algorithms.md §6.1) by
rejection sampling with proposals from p, for rewards with a known maximum: what the toy benchmark's tilted-teacher
rows use to show the target a reward-tilted student approaches."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def reward_upper_bound(reward: Any) -> float:
    """The reward's stated maximum (its `upper_bound` attribute, e.g. 0 for digits-class's log-probability).
    Raises ValueError (one line, with the fix) for a reward without one."""
    bound = getattr(reward, "upper_bound", None)
    if bound is None:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"a tilt needs a reward with a known maximum (e.g. digits-class), not {name}")
    return float(bound)


def tilt_accept_prob(scores: torch.Tensor, beta: float, upper_bound: float) -> torch.Tensor:
    """Acceptance probability exp((r - r_max) / beta) of rejection sampling from the reward-tilted target
    p(x) exp(r(x) / beta) (RTDMD, algorithms.md §6.1) with proposals from p: an exact sampler when r <= r_max."""
    if beta <= 0:
        raise ValueError(f"tilt beta must be > 0, got {beta}")
    if bool((scores > upper_bound + 1e-6).any()):
        raise ValueError(f"a reward of {float(scores.max()):.4g} exceeds its stated upper bound {upper_bound}")
    return torch.exp((scores.double() - upper_bound) / beta).clamp(max=1.0)


def accept_uniform(seed: int) -> float:
    """The acceptance test's uniform for the proposal drawn with `seed`: from numpy's SeedSequence of (seed, a fixed
    tag), a stream independent of the torch generator that `seed` drives for the proposal's own noise (the same
    stream would tie the test to the proposal's first noise values)."""
    return float(np.random.default_rng((seed, 0x7117)).random())


def rejection_sample(propose: Callable[[list[int], list[int]], tuple[torch.Tensor, torch.Tensor]], n: int,
                     beta: float, upper_bound: float, seed: int, max_rounds: int = 100) -> torch.Tensor:
    """n exact draws from p(x) exp(r(x) / beta), one per slot: `propose(slots, seeds)` returns draws from p and their
    rewards; slot i proposes seed + i + k * n in round k and keeps the first draw accepted, its uniform keyed by the
    same seed (`accept_uniform`), so the result does not depend on batching. Raises ValueError where a slot finds
    none."""
    out: list[torch.Tensor | None] = [None] * n
    pending = list(range(n))
    for k in range(max_rounds):
        if not pending:
            break
        seeds = [seed + i + k * n for i in pending]
        draws, scores = propose(pending, seeds)
        accept = tilt_accept_prob(scores, beta, upper_bound)
        for j, (i, s) in enumerate(zip(pending, seeds)):
            if accept_uniform(s) < accept[j]:
                out[i] = draws[j]
        pending = [i for i in pending if out[i] is None]
    if pending:
        raise ValueError(f"tilt beta={beta:g}: {len(pending)} of {n} slots had no accepted draw in {max_rounds} "
                         "rounds; use a larger beta")
    return torch.stack(out)
