"""Analytic teachers with no weights, for CPU tests of distillation math (algorithms.md §0.7, §8.4).

Data laws whose posterior mean E[x0 | x_t] is closed-form under any fewstep `Schedule` (x_t = alpha x0 + sigma eps):

- `GaussianDenoiser`: x0 ~ N(mu, diag(var)). Also the *exact fake score* of a Gaussian generator x = m + s z
  (use mu = m, var = s^2), so DMD tests need no fake network (§0.7).
- `GaussianMixtureDenoiser`: x0 ~ sum_k pi_k N(mu_k, std_k^2 I), the 2-D ring of architecture.md §6 S6.

Both are `nn.Module`s with `forward(x_t, t, cond=None) -> x0` and a `schedule` attribute, i.e. fewstep denoisers.
The math runs in float64; the output is float32 (float64 when x_t is float64, for identity tests at 1e-10).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule, bcast


def _out_dtype(x: Tensor) -> torch.dtype:
    """float32 per the denoiser convention, float64 kept for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_t(t: Tensor | float, x_t: Tensor) -> Tensor:
    """A scalar time becomes one per sample [B]."""
    t = torch.as_tensor(t, device=x_t.device)
    return t.expand(len(x_t)) if t.ndim == 0 else t


class GaussianDenoiser(nn.Module):
    """Exact x0hat for diagonal Gaussian data x0 ~ N(mu, diag(var)) (algorithms.md §0.7):

        x0hat(x_t) = mu + a var / (a^2 var + b^2) * (x_t - a mu),   with (a, b) = schedule.alpha_sigma(t).

    Args:
        mu: mean, broadcastable to one sample's shape (x_t.shape[1:]); a scalar works.
        var: per-element variance, same broadcasting as `mu` (must be > 0 unless b > 0 everywhere).
        schedule: any fewstep `Schedule` (DiscreteVP or RectifiedFlow).
    """

    def __init__(self, mu: Tensor | float, var: Tensor | float, schedule: Schedule) -> None:
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu).detach().double())
        self.register_buffer("var", torch.as_tensor(var).detach().double())
        self.schedule = schedule

    def marginal(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean a mu and variance a^2 var + b^2 of p_t, broadcast against `like` [B, ...] (float64)."""
        a, b = (bcast(v, like.double()) for v in self.schedule.alpha_sigma(_per_sample_t(t, like)))
        return a * self.mu, a**2 * self.var + b**2

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x_t) = -(x_t - a mu) / (a^2 var + b^2) (§0.7); float64."""
        mean, var_t = self.marginal(t, x_t)
        return -(x_t.double() - mean) / var_t

    def forward(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        x = x_t.double()                                                     # [B, ...]
        a, b = (bcast(v, x) for v in self.schedule.alpha_sigma(_per_sample_t(t, x_t)))
        gain = a * self.var / (a**2 * self.var + b**2)                       # [B, ...] posterior gain
        return (self.mu + gain * (x - a * self.mu)).to(_out_dtype(x_t))


class GaussianMixtureDenoiser(nn.Module):
    """Exact E[x0 | x_t] for an isotropic Gaussian mixture sum_k pi_k N(mu_k, std_k^2 I) (algorithms.md §0.7;
    architecture.md §6 S6, generalised to weights, per-component std and any `Schedule`).

    The posterior mean is the responsibility-weighted sum of per-component posterior means,
    r_k ∝ pi_k N(x_t; a mu_k, (a^2 std_k^2 + b^2) I), m_k = mu_k + a std_k^2 / (a^2 std_k^2 + b^2) (x_t - a mu_k).

    Args:
        means: [K, *shape] component means; x_t is [B, *shape] (flattened to D = prod(shape) internally).
        std: float or [K] per-component isotropic standard deviation.
        schedule: any fewstep `Schedule`.
        weights: optional [K] mixture weights (normalised here); equal weights by default.
    """

    def __init__(self, means: Tensor, std: float | Tensor, schedule: Schedule, weights: Tensor | None = None) -> None:
        super().__init__()
        k = len(means)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        self.register_buffer("means", means.detach().double())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64).expand(k).clone())
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.schedule = schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        x = x_t.double().flatten(1)                                          # [B, D]
        mu = self.means.flatten(1)                                           # [K, D]
        a, b = (v.double().to(x.device)[:, None] for v in self.schedule.alpha_sigma(_per_sample_t(t, x_t)))
        s2 = self.std**2                                                     # [K]
        var = a**2 * s2 + b**2                                               # [B, K] marginal variance
        diff = x[:, None, :] - a[:, :, None] * mu                            # [B, K, D]
        logp = -(diff**2).sum(-1) / (2 * var) - 0.5 * x.shape[1] * var.log() + self.log_weights   # [B, K]
        resp = logp.softmax(-1)[..., None]                                   # [B, K, 1]
        post = mu + (a * s2 / var)[..., None] * diff                         # [B, K, D]
        return (resp * post).sum(1).reshape(x_t.shape).to(_out_dtype(x_t))


def ring_means(k: int = 8, radius: float = 2.0) -> Tensor:
    """[k, 2] means evenly spaced on a circle of `radius` (the 2-D 8-mode toy of architecture.md §5, §8)."""
    angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return (radius * torch.stack([angle.cos(), angle.sin()], -1)).float()


def sample_mixture(means: Tensor, std: float | Tensor, n: int, generator: torch.Generator | None = None,
                   weights: Tensor | None = None) -> Tensor:
    """n samples [n, *shape] of sum_k pi_k N(mu_k, std_k^2 I); equal weights unless `weights` [K] is given."""
    k = len(means)
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    idx = torch.multinomial(w, n, replacement=True, generator=generator)              # [n]
    std_k = torch.as_tensor(std, dtype=torch.float32).expand(k)[idx]                   # [n]
    noise = torch.randn((n, *means.shape[1:]), generator=generator)                    # [n, *shape]
    return means.float()[idx] + bcast(std_k, noise) * noise


def mode_coverage(samples: Tensor, means: Tensor, std: float | Tensor) -> tuple[float, Tensor]:
    """Mode-coverage metric of the toy tests (architecture.md §5 "toy convergence").

    Each sample is assigned to its nearest mean (Euclidean). Returns
    - the share of samples within 3 std (of that component) of their nearest mean; a perfect sampler of a
      2-D isotropic mixture with well separated modes scores 1 - e^{-4.5} = 98.9 %;
    - per_mode_fraction [K]: the share of *all* samples whose nearest mean is k (sums to 1; balanced is 1/K).
    """
    x, mu = samples.double().flatten(1), means.double().flatten(1)                     # [N, D], [K, D]
    dist = torch.cdist(x, mu)                                                          # [N, K]
    d_min, nearest = dist.min(-1)                                                      # [N]
    std_k = torch.as_tensor(std, dtype=torch.float64).expand(len(mu))[nearest]          # [N]
    within = float((d_min < 3 * std_k).double().mean())
    per_mode = torch.bincount(nearest, minlength=len(mu)).double() / len(x)
    return within, per_mode
