"""Sample grids: an optional caption strip above the grid; without one the PNG is what it always was."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.train.report import save_grid, wrap_words

CAPTION = "lcm · step 250/1000 · 4 steps (t=0.999,0.760,0.499,0.259) · guidance 1"


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def reference_grid(x: torch.Tensor, path: Path) -> np.ndarray:
    """The grid as save_grid wrote it before captions: nearest x4 upscale, then torchvision's save_image."""
    from torchvision.utils import save_image

    up = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")
    save_image(up, str(path), nrow=int(math.ceil(math.sqrt(len(x)))), padding=2, pad_value=0.5)
    return np.asarray(Image.open(path))


def test_without_caption_the_png_is_unchanged(tmp_path: Path):
    x = images()
    plain = np.asarray(Image.open(save_grid(x, tmp_path / "plain.png")))
    assert np.array_equal(plain, reference_grid(x, tmp_path / "ref.png"))
    assert np.array_equal(np.asarray(Image.open(save_grid(x, tmp_path / "none.png", caption=None))), plain)


def test_caption_is_a_text_strip_above_the_grid(tmp_path: Path):
    x = images()
    plain = np.asarray(Image.open(save_grid(x, tmp_path / "plain.png")))
    captioned = np.asarray(Image.open(save_grid(x, tmp_path / "captioned.png", caption=CAPTION)))
    extra = captioned.shape[0] - plain.shape[0]
    assert extra > 0 and captioned.shape[1:] == plain.shape[1:]   # taller, same width
    strip = captioned[:extra]
    assert strip.min() < strip.max()                               # text drawn, not a blank band
    assert np.array_equal(captioned[extra:], plain)                # the grid below is untouched


def test_long_captions_wrap_to_the_grid_width():
    lines = wrap_words(CAPTION, 60, lambda s: 6 * len(s))
    assert len(lines) > 1 and " ".join(lines) == CAPTION
    assert all(6 * len(line) <= 60 for line in lines if " " in line)
