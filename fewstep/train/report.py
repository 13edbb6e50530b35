"""What a person looks at: sample grids (PNG) and loss curves."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from PIL import Image


CAPTION_PAD = 4      # pixels around the caption text
CAPTION_BG = (255, 255, 255)
CAPTION_FG = (0, 0, 0)


def grid_image(images: torch.Tensor, nrow: int | None = None, upscale: int = 4) -> Image.Image:
    """Images [N, C, H, W] in [0, 1] -> one RGB PIL grid (as torchvision's `save_image` builds it); small images
    are upscaled (nearest) so they can be seen."""
    from PIL import Image
    from torchvision.utils import make_grid

    if upscale > 1 and images.shape[-1] < 64:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    grid = make_grid(images, nrow=nrow or int(math.ceil(math.sqrt(len(images)))), padding=2, pad_value=0.5)
    return Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy())


def wrap_words(text: str, width: int, measure: Callable[[str], float]) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` (a single over-long word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def caption_strip(text: str, width: int) -> Image.Image:
    """A white strip `width` pixels wide holding `text` in black (PIL's default font), wrapped to fit."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = wrap_words(text, width - 2 * CAPTION_PAD, font.getlength)
    line_h = max(font.getbbox("Ag·")[3], 1) + 2
    strip = Image.new("RGB", (width, len(lines) * line_h + 2 * CAPTION_PAD), CAPTION_BG)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((CAPTION_PAD, CAPTION_PAD + i * line_h), line, fill=CAPTION_FG, font=font)
    return strip


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, upscale: int = 4,
              caption: str | None = None) -> Path:
    """Images [N, C, H, W] in [0, 1] -> one PNG; small images are upscaled (nearest) so they can be seen.
    `caption`: a text strip above the grid (e.g. recipe, step and sampling settings)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = grid_image(images, nrow, upscale)
    if caption:
        strip = caption_strip(caption, grid.width)
        framed = Image.new("RGB", (grid.width, strip.height + grid.height))
        framed.paste(strip, (0, 0))
        framed.paste(grid, (0, strip.height))
        grid = framed
    grid.save(str(path))
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
