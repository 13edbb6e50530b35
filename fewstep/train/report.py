"""What a person looks at: sample grids (PNG) and loss curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, upscale: int = 4) -> Path:
    """Images [N, C, H, W] in [0, 1] -> one PNG; small images are upscaled (nearest) so they can be seen."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    if upscale > 1 and images.shape[-1] < 64:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    save_image(images, str(path), nrow=nrow or int(math.ceil(math.sqrt(len(images)))), padding=2, pad_value=0.5)
    return path


def plot_losses(metrics_file: Path, out: Path) -> Path | None:
    """Loss curves from metrics.jsonl (one line per logged step) -> PNG."""
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
