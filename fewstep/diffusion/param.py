"""Parameterisation conversions. Every conversion is affine in the network output at fixed (x_t, t), which is why
classifier-free guidance gives the same answer in any of them (algorithms.md §0.5).

Conventions (alpha, sigma already broadcast to x_t):
- eps:  x0 = (x_t - sigma * eps) / alpha                         (Ho et al. 2020, Eq. 9)
- v:    v = alpha * eps - sigma * x0,  x0 = alpha * x_t - sigma * v   (Salimans & Ho 2022, §4; VP only)
- flow: u = eps - x0,  x0 = x_t - sigma * u                        (rectified flow, sigma = t)
- x0 / sample: the output is x0.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

Prediction = Literal["eps", "v", "flow", "x0"]
PREDICTIONS: tuple[str, ...] = ("eps", "v", "flow", "x0")

# diffusers' names for the same things
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def to_x0(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """Raw network output -> clean estimate x0."""
    if kind == "x0":
        return out
    if kind == "eps":
        return (x_t - sigma * out) / alpha
    if kind == "v":
        return alpha * x_t - sigma * out
    if kind == "flow":
        return x_t - sigma * out
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")


def from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """Clean estimate x0 -> the network output of parameterisation `kind` (inverse of `to_x0`)."""
    if kind == "x0":
        return x0
    if kind == "eps":
        return (x_t - alpha * x0) / sigma
    if kind == "v":
        return (alpha * x_t - x0) / sigma
    if kind == "flow":
        return (x_t - x0) / sigma
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by x0 at x_t: eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def cfg(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance, Imagen/diffusers form (Ho & Salimans 2022, Eq. 6): u + w (c - u); w = 1 is off.
    The LCM form c + omega (c - u) is this with w = omega + 1."""
    return uncond + scale * (cond - uncond)
