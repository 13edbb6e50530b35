"""Training data sources behind one interface: an indexable set of (image in [-1, 1] or None, prompt)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.errors import FewstepError


class DigitsDataset(Dataset):
    """sklearn digits at `size` pixels with prompts "a handwritten digit d" (the toy teacher's training data)."""

    def __init__(self, size: int = 16) -> None:
        from fewstep.data.digits import digit_prompt, load_digit_images

        self.images, labels = load_digit_images(size)
        self.prompts = [digit_prompt(int(d)) for d in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        return self.images[i], self.prompts[i]


class ImageTextFolder(Dataset):
    """A folder with images and `metadata.jsonl` rows {"file_name": ..., "text": ...} (the Hugging Face
    imagefolder layout), resized and centre-cropped to `size`."""

    def __init__(self, root: str, size: int, center_crop: bool = True) -> None:
        from torchvision import transforms

        self.root = Path(root)
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise FewstepError(f"data.path={root} has no metadata.jsonl; write one row per image: "
                               '{"file_name": "0001.png", "text": "a prompt"}')
        self.rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        if not self.rows:
            raise FewstepError(f"{meta} is empty; add one row per training image")
        crop = transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size)
        self.tf = transforms.Compose([transforms.Resize(size), crop, transforms.ToTensor(),
                                      transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        from PIL import Image

        row = self.rows[i]
        with Image.open(self.root / row["file_name"]) as img:
            return self.tf(img.convert("RGB")), str(row.get("text", ""))


def read_prompts(path: str) -> list[str]:
    from fewstep.paths import read_prompt_file

    return read_prompt_file(path)


class PromptList(Dataset):
    """Prompts only (data-free recipes); items carry no image."""

    def __init__(self, path: str) -> None:
        self.prompts = read_prompts(path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[None, str]:
        return None, self.prompts[i]


def make_dataset(source: str, path: str, size: int, center_crop: bool = True) -> Dataset:
    if source == "digits":
        return DigitsDataset(size)
    if source == "folder":
        return ImageTextFolder(path, size, center_crop)
    return PromptList(path)


def batch_indices(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the batch consumed at `step`: a pure function of (seed, step), so resuming needs no loader state.
    Each epoch is a fresh seeded permutation; each process takes its own slice of the global batch."""
    per_epoch = max(n // (batch_size * world), 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (pos * world + rank) * batch_size
    return [int(perm[(start + j) % n]) for j in range(batch_size)]


def collate(items: list[tuple[Tensor | None, str]]) -> tuple[Tensor | None, list[str]]:
    images = [im for im, _ in items]
    stacked = torch.stack(images) if all(im is not None for im in images) else None
    return stacked, [p for _, p in items]
