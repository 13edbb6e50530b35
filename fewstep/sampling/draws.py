"""Random draws keyed so that a run's math does not depend on how many processes share it.

A training iteration's randomness comes in two kinds:
- per-sample draws (noise, timesteps, guidance scales, cache indices): one generator per sample, seeded by
  (run seed, step, the sample's position in the step's global batch). Sample j gets the same numbers whether it
  sits in a batch of 64 on one process or a batch of 32 on the second of two processes.
- shared draws (DMD2's backward-simulation step, Phased DMD's phase): one generator seeded by (run seed, step,
  micro-step), the same on every process, since the whole global batch takes the same choice.

Every helper takes `Generators`: a single generator (one stream for the whole batch, as the analytic tests use)
or a list with one generator per sample (what the trainer passes), like `steps.randn` and diffusers' `randn_tensor`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fewstep.sampling.steps import Generators, randn

__all__ = ["Draws", "Generators", "key_seed", "rand", "randint", "randn", "uniform"]

SAMPLE, SHARED = 0, 1   # key domains: a per-sample key never equals a shared one
RECIPE, DATA = 0, 1     # streams: the recipe's draws, and the trainer's (VAE latent sampling of real images)


def key_seed(*key: int) -> int:
    """A 63-bit seed from integers, mixed by numpy's SeedSequence (neighbouring keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rand(generator: Generators, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[n] uniforms in [0, 1): one per sample from its own generator when a list is given."""
    if isinstance(generator, (list, tuple)):
        _check_len(generator, n)
        return torch.cat([torch.rand(1, generator=g, dtype=dtype) for g in generator])
    return torch.rand(n, generator=generator, dtype=dtype)


def uniform(generator: Generators, n: int, low: float, high: float, device: torch.device | str = "cpu") -> Tensor:
    """[n] draws of U[low, high) on `device`."""
    return (rand(generator, n) * (high - low) + low).to(device)


def randint(generator: Generators, high: int, n: int) -> Tensor:
    """[n] integers in [0, high) (int64, on the host)."""
    if isinstance(generator, (list, tuple)):
        _check_len(generator, n)
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generator])
    return torch.randint(0, high, (n,), generator=generator)


def _check_len(generators: Sequence[torch.Generator], n: int) -> None:
    if len(generators) != n:
        raise ValueError(f"{len(generators)} per-sample generators for a batch of {n}")


@dataclass
class Draws:
    """One micro-step's randomness: `sample` feeds per-sample draws, `shared` the choices the global batch shares."""

    sample: Generators
    shared: torch.Generator

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> "Draws":
        """Both kinds from one stream (single-process tests and scripts)."""
        return cls(generator, generator)

    @classmethod
    def keyed(cls, seed: int, step: int, micro: int, positions: Sequence[int], stream: int = RECIPE) -> "Draws":
        """The trainer's draws at (step, micro-step) for the samples at `positions` of the step's global batch."""
        sample = [torch.Generator().manual_seed(key_seed(seed, step, stream, SAMPLE, p)) for p in positions]
        return cls(sample, torch.Generator().manual_seed(key_seed(seed, step, stream, SHARED, micro)))

    def choice(self, low: int, high: int) -> int:
        """One integer in [low, high) that every process draws alike."""
        return int(torch.randint(low, high, (1,), generator=self.shared))
