"""sklearn's handwritten digits as a tiny image dataset for the embedded `toy-digits` teacher.

Images keep the dataset polarity (bright ink on a dark background). Upsampling is nearest-neighbour, so an
area downsample (`avg_pool2d`) back to 8x8 returns the original pixels exactly; the nearest-class-mean
classifier below works on those 8x8 pixels and scores generated samples without any trained network.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT_TEMPLATE = "a handwritten digit {d}"
_PROMPT_RE = re.compile(r"^\s*a handwritten digit ([0-9])\s*$")


def load_digit_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1797 sklearn digits as float32 images [N, 3, size, size] in [-1, 1] and int64 labels [N].

    `size` must be a multiple of 8; values 0..16 are scaled to [0, 1], nearest-upsampled, mapped to [-1, 1]
    and the gray channel is copied to RGB.
    """
    from sklearn.datasets import load_digits

    if size % 8 != 0 or size <= 0:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, scale_factor=size // 8, mode="nearest")
    x = (x * 2.0 - 1.0).repeat(1, 3, 1, 1).contiguous()
    return x, torch.as_tensor(data.target, dtype=torch.int64)


def digit_prompt(d: int) -> str:
    """The prompt for digit `d` (0..9): "a handwritten digit {d}"."""
    if not 0 <= int(d) <= 9:
        raise ValueError(f"digit must be in 0..9, got {d}")
    return PROMPT_TEMPLATE.format(d=int(d))


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt of the form "a handwritten digit {d}" asks for, or None for any other prompt."""
    m = _PROMPT_RE.match(prompt)
    return int(m.group(1)) if m else None


def class_balanced_prompts(n: int) -> list[str]:
    """`n` prompts cycling through the digits: prompt i asks for digit i % 10."""
    return [digit_prompt(i % 10) for i in range(n)]


def to_8x8_gray(images: Tensor) -> Tensor:
    """Images in [-1, 1] ([N, C, H, W], H = W a multiple of 8) -> gray 8x8 in [0, 1], flattened to [N, 64]."""
    x = (images.float().mean(1, keepdim=True).clamp(-1, 1) + 1) / 2
    x = F.avg_pool2d(x, kernel_size=x.shape[-1] // 8)
    return x.flatten(1)


def digit_class_means(size: int = 16) -> Tensor:
    """Per-class mean of the real digits as 8x8 gray in [0, 1]: [10, 64]."""
    x, y = load_digit_images(size)
    flat = to_8x8_gray(x)
    return torch.stack([flat[y == c].mean(0) for c in range(10)])


def classify_nearest_mean(images: Tensor, means: Tensor) -> Tensor:
    """Nearest-class-mean labels [N] (int64) of images in [-1, 1] against `digit_class_means()`."""
    return torch.cdist(to_8x8_gray(images), means.float()).argmin(1)
