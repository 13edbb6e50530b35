"""Offline digits metric: the real Frechet-distance code path on a tiny CNN trained on scikit-learn's digits.

Honest offline fallback of the evaluation harness (evaluation.md section 7); values are reported as
``fid[digits-cnn]`` and are not comparable with Inception FID. Images: bright ink on a dark background, any
size that area-downsamples to 8x8; the real reference is ``load_digits()`` with pixel = value / 16 * 255.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

METRIC_NAME = "fid[digits-cnn]"  # name under which the digits Frechet distance is reported (not Inception FID)
MLP_METRIC_NAME = "fid[digits-mlp]"  # the second, independent digits feature space (DigitsMLP, other split)

NUM_CLASSES = 10
# Shipped classifier weights, written by scripts/train_digits_classifier.py.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits-classifier.safetensors"
# Second, independent classifier (different architecture and training split): scripts/train_digits_classifier.py
# --arch mlp. A toy "student beats teacher" claim stands only where fid[digits-cnn] and fid[digits-mlp] agree.
MLP_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits-mlp.safetensors"
CNN_SEED = 0  # the CNN's init and split_digits(seed=0, heldout_fraction=0.2)
MLP_SEED = 1  # the MLP's init and split_digits(seed=1, heldout_fraction=0.2): a different held-out set

ArrayLike = Tensor | np.ndarray | Sequence[Any]


class DigitsNet(nn.Module):
    """Tiny CNN on 1x8x8 inputs in [0, 1]: two conv layers -> 32-d embedding -> 10-way head.

    ``features(x)`` is the embedding used for Frechet distance and diversity, ``forward(x)`` the logits.
    """

    num_features: int = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.embed = nn.Linear(32 * 4 * 4, self.num_features)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Return the (N, 32) embedding of (N, 1, 8, 8) images in [0, 1]."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.embed(h.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Return (N, 10) class logits of (N, 1, 8, 8) images in [0, 1]."""
        return self.head(self.features(x))


class DigitsMLP(nn.Module):
    """Fully connected net on flattened 8x8 inputs in [0, 1]: 64 -> 128 -> 128 -> 64-d embedding -> 10-way head.

    No convolutions and no pooling: an independent feature space for the second digits FID (``fid[digits-mlp]``).
    Same interface as ``DigitsNet``: ``features(x)`` (N, 64), ``head``, ``forward(x)`` logits.
    """

    num_features: int = 64

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.embed = nn.Linear(128, self.num_features)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Return the (N, 64) embedding of (N, 1, 8, 8) images in [0, 1]."""
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.embed(h)

    def forward(self, x: Tensor) -> Tensor:
        """Return (N, 10) class logits of (N, 1, 8, 8) images in [0, 1]."""
        return self.head(self.features(x))


ARCHS: dict[str, type[nn.Module]] = {"cnn": DigitsNet, "mlp": DigitsMLP}  # --arch of the training script
DigitsModel = DigitsNet | DigitsMLP


class DigitsFeatureExtractor(nn.Module):
    """``DigitsNet`` embedding of anything ``to_digits_input`` accepts, for torchmetrics' ``feature=``."""

    def __init__(self, model: DigitsModel) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.num_features

    def forward(self, images: Tensor) -> Tensor:
        """Convert images to 8x8 grey and embed them."""
        return self.model.features(to_digits_input(images))


def _as_tensor(images: ArrayLike) -> Tensor:
    """Turn a tensor, numpy array or sequence of arrays / PIL images into a CPU tensor."""
    if isinstance(images, Tensor):
        return images.detach().cpu()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images))
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))


def to_digits_input(images: ArrayLike) -> Tensor:
    """Convert a batch of images to a float32 tensor (N, 1, 8, 8) in [0, 1].

    Accepts [N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3, 4} (alpha is dropped), as uint8 in
    [0, 255] (any integer dtype is divided by 255) or float in [0, 1] (clamped). Colour is reduced by the
    mean of the channels and the image is area-downsampled to 8x8 (exact for sizes that are multiples of 8).
    """
    x = _as_tensor(images)
    x = x.float() / 255.0 if not torch.is_floating_point(x) else x.float().clamp(0.0, 1.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ValueError(f"cannot tell the channel axis of images with shape {tuple(x.shape)}")
        x = x[:, :3].mean(dim=1, keepdim=True)
    else:
        raise ValueError(f"expected [N,H,W], [N,H,W,C] or [N,C,H,W] images, got shape {tuple(x.shape)}")
    if x.shape[-2] < 8 or x.shape[-1] < 8:
        raise ValueError(f"images must be at least 8x8, got {tuple(x.shape[-2:])}")
    return F.adaptive_avg_pool2d(x, (8, 8)).contiguous()


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images, labels), parsed once per process."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def digits_arrays() -> tuple[Tensor, Tensor]:
    """Return scikit-learn's digits as float (1797, 8, 8) in [0, 1] (value / 16) and int64 labels."""
    images, labels = _load_digits()
    return torch.from_numpy(images / 16.0).float(), torch.from_numpy(labels).long()


def reference_digits(size: int = 16) -> tuple[Tensor, Tensor]:
    """Return the real reference set: all 1797 digits as uint8 (N, size, size) and int64 labels.

    Pixels are ``round(value / 16 * 255)``, nearest-upsampled from 8x8; ``size`` must be a multiple of 8.
    """
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    x, y = digits_arrays()
    img, k = torch.round(x * 255.0).to(torch.uint8), size // 8
    return img.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).contiguous(), y


def split_digits(seed: int, heldout_fraction: float) -> tuple[Tensor, Tensor]:
    """Return a seeded, class-stratified split of the 1797 digit indices as (kept, heldout)."""
    from sklearn.model_selection import train_test_split

    _, y = digits_arrays()
    idx = np.arange(len(y))
    kept, held = train_test_split(idx, test_size=heldout_fraction, random_state=seed, stratify=y.numpy())
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread (the model is tiny; threads only add overhead), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _augment(x: Tensor, gen: torch.Generator, noise: float) -> Tensor:
    """Randomly shift (N, 1, 8, 8) images by up to one pixel (zero fill) and add small Gaussian noise."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    oy, ox, ar = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen), torch.arange(8)
    rows, cols = (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    return (shifted + noise * torch.randn(shifted.shape, generator=gen)).clamp(0.0, 1.0)


@torch.no_grad()
def classifier_accuracy(model: DigitsModel, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on (N, 1, 8, 8) images ``x`` with labels ``y``."""
    return float((model(x).argmax(dim=1) == y).float().mean())


def train_digits_classifier(
    seed: int = 0, steps: int = 1500, batch_size: int = 128, lr: float = 3e-3, heldout_fraction: float = 0.2,
    arch: str = "cnn",
) -> tuple[DigitsModel, float]:
    """Train a ``DigitsNet`` (``arch="cnn"``) or ``DigitsMLP`` (``"mlp"``) on scikit-learn digits (x / 16) and
    return it with its held-out accuracy.

    The held-out split is seeded and stratified (``split_digits(seed, heldout_fraction)``); training uses Adam with
    cosine decay and light augmentation (+-1 pixel shifts, Gaussian noise 0.05). Fully determined by ``seed`` on
    one machine.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown digits classifier arch {arch!r}: use one of {', '.join(ARCHS)}")
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # parameter initialisation
    model = ARCHS[arch]()
    torch.random.set_rng_state(torch_state)
    x, y = digits_arrays()
    x = x.unsqueeze(1)
    kept, held = split_digits(seed, heldout_fraction)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    with single_thread():
        model.train()
        for _ in range(steps):
            batch = kept[torch.randint(0, len(kept), (batch_size,), generator=gen)]
            loss = F.cross_entropy(model(_augment(x[batch], gen, noise=0.05)), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, classifier_accuracy(model, x[held], y[held])


def save_digits_classifier(model: DigitsModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights to a safetensors file (string ``metadata`` is stored in the header)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metric = MLP_METRIC_NAME if isinstance(model, DigitsMLP) else METRIC_NAME
    save_file(tensors, str(path), metadata={"arch": type(model).__name__, "metric": metric, **(metadata or {})})
    return path


def load_digits_classifier(path: str | Path | None = None) -> DigitsModel:
    """Load a digits classifier (eval mode) from a safetensors file; default: the shipped CNN weights.

    The class (``DigitsNet`` or ``DigitsMLP``) is read from the header's ``arch`` (absent: ``DigitsNet``).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights not found: {path}; "
                                "run scripts/train_digits_classifier.py")
    with safe_open(str(path), framework="pt") as f:
        arch = (f.metadata() or {}).get("arch", "DigitsNet")
    classes = {cls.__name__: cls for cls in ARCHS.values()}
    if arch not in classes:
        raise ValueError(f"{path}: unknown digits classifier arch {arch!r} (expected one of {', '.join(classes)})")
    model = classes[arch]()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _default_classifier() -> DigitsNet:
    """The shipped classifier, loaded once per process (treat it as read-only)."""
    return load_digits_classifier()


@functools.lru_cache(maxsize=1)
def default_mlp() -> DigitsMLP:
    """The shipped second classifier (``DigitsMLP``, ``fid[digits-mlp]``), loaded once per process (read-only)."""
    return load_digits_classifier(MLP_WEIGHTS)


@torch.no_grad()
def digits_features(model: DigitsModel, images: ArrayLike, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Return (features (N, d), logits (N, 10)) of ``images`` (anything ``to_digits_input`` accepts);
    d = ``model.num_features`` (32 for the CNN, 64 for the MLP)."""
    x = to_digits_input(images)
    feats, logits = [], []
    with single_thread():
        for chunk in x.split(batch_size):
            f = model.features(chunk)
            feats.append(f)
            logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


def frechet_distance(mu1: ArrayLike, s1: ArrayLike, mu2: ArrayLike, s2: ArrayLike) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2), via ``cleanfid.fid.frechet_distance``.

    clean-fid 0.1.35 calls ``scipy.linalg.sqrtm(..., disp=False)``; SciPy 1.17 deprecates ``disp`` for removal
    in 1.18. If that call fails with ``TypeError``, torchmetrics' ``_compute_fid`` (eigenvalue form) is used.
    """
    from cleanfid.fid import frechet_distance as _cleanfid_frechet

    args = [_as_tensor(a).double().numpy() for a in (mu1, s1, mu2, s2)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*`disp` argument", category=DeprecationWarning)
            return float(_cleanfid_frechet(*args))
    except TypeError:  # SciPy >= 1.18 dropped sqrtm(disp=...)
        from torchmetrics.image.fid import _compute_fid

        return float(_compute_fid(*(torch.from_numpy(a) for a in args)))


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64 numpy) of (N, d) features, as clean-fid/torchmetrics compute them."""
    f = features.double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows; NaN for fewer than two rows."""
    return float(torch.pdist(features.double()).mean()) if len(features) >= 2 else math.nan


def _class_spreads(features: Tensor, labels: Tensor) -> np.ndarray:
    """Per-class mean pairwise feature distance, (10,) float64 (NaN for classes with < 2 images)."""
    return np.array([_mean_pairwise_distance(features[labels == c]) for c in range(NUM_CLASSES)])


@dataclass(frozen=True)
class DigitsReference:
    """Feature statistics of a real reference set: mean, covariance, per-class spread and size."""

    mu: np.ndarray
    sigma: np.ndarray
    class_spread: np.ndarray
    n: int


def digits_reference(
    model: DigitsModel | None = None, images: ArrayLike | None = None, labels: ArrayLike | None = None
) -> DigitsReference:
    """Build reference statistics; default images are all 1797 real digits (``reference_digits()``)."""
    if model is None and images is None:
        return _default_reference()
    model = model if model is not None else _default_classifier()
    if images is None:
        images, labels = reference_digits()
    if labels is None:
        raise ValueError("labels are required with custom reference images")
    feats, _ = digits_features(model, images)
    mu, sigma = feature_statistics(feats)
    return DigitsReference(mu, sigma, _class_spreads(feats, _as_tensor(labels).long()), len(feats))


@functools.lru_cache(maxsize=1)
def _default_reference() -> DigitsReference:
    """Reference statistics of all real digits under the shipped classifier, computed once per process."""
    return digits_reference(_default_classifier(), *reference_digits())


@functools.lru_cache(maxsize=1)
def mlp_reference() -> DigitsReference:
    """Reference statistics of all real digits under the shipped ``DigitsMLP``, computed once per process."""
    return digits_reference(default_mlp(), *reference_digits())


def digits_mlp_fid(images: ArrayLike) -> float:
    """``fid[digits-mlp]`` of generated images: Frechet distance of shipped ``DigitsMLP`` features vs all real digits.

    Report it next to ``score_digits(...).fid`` (``fid[digits-cnn]``); an ordering of two image sets stands only
    where both agree.
    """
    feats, _ = digits_features(default_mlp(), images)
    if len(feats) < 2:
        raise ValueError("need at least two generated images to estimate a covariance")
    mu, sigma = feature_statistics(feats)
    ref = mlp_reference()
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


@dataclass(frozen=True)
class DigitsScores:
    """Scores of a generated digit set.

    fid: Frechet distance of DigitsNet features, generated vs real reference (reported as ``fid[digits-cnn]``).
    class_accuracy: fraction of images the classifier assigns to the prompted label.
    diversity: mean over prompted classes of (mean pairwise feature distance among generated images of that
        class) / (same among real images of that class); about 1 for real data, near 0 for mode collapse.
    n: number of generated images.
    """

    fid: float
    class_accuracy: float
    diversity: float
    n: int
    metric_name: str = METRIC_NAME

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat dict for reports, with the FID key spelled ``fid[digits-cnn]``."""
        d = asdict(self)
        return {self.metric_name: d.pop("fid"), **{k: v for k, v in d.items() if k != "metric_name"}}


def score_digits(
    images: ArrayLike,
    labels: ArrayLike,
    model: DigitsModel | None = None,
    reference: DigitsReference | None = None,
) -> DigitsScores:
    """Score generated digit images against their prompted ``labels`` (ints 0-9).

    ``model`` defaults to the shipped classifier and ``reference`` to all real digits under ``model``.
    Classes with fewer than two generated images are left out of ``diversity`` (NaN if none remain).
    """
    if reference is None:
        reference = _default_reference() if model is None else digits_reference(model)
    model = model if model is not None else _default_classifier()
    labels_t = _as_tensor(labels).long().flatten()
    feats, logits = digits_features(model, images)
    if len(feats) != len(labels_t):
        raise ValueError(f"{len(feats)} images but {len(labels_t)} labels")
    if len(feats) < 2:
        raise ValueError("need at least two generated images to estimate a covariance")
    mu, sigma = feature_statistics(feats)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    accuracy = float((logits.argmax(dim=1) == labels_t).float().mean())
    ratios = _class_spreads(feats, labels_t) / reference.class_spread
    ratios = ratios[np.isfinite(ratios)]
    diversity = float(ratios.mean()) if len(ratios) else math.nan
    return DigitsScores(fid=fid, class_accuracy=accuracy, diversity=diversity, n=len(feats))


def with_noise(x: Tensor, sigma: float, seed: int = 0) -> Tensor:
    """Add seeded Gaussian pixel noise to float images in [0, 1] and clamp back to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


def digits_sanity_table(seed: int = 0, model: DigitsNet | None = None) -> list[dict[str, float | int | str]]:
    """Score corrupted real sets against a disjoint real half, for the record (cf. evaluation.md section 7).

    The digits are split in two seeded, stratified halves: one is the reference, the other the "generated"
    set, which is scored as is, with Gaussian pixel noise (8x8 level), with only digits 0-4 kept
    ("half classes"), with prompts 5-9 answered by digits 0-4 ("mode-dropped prompts") and with one
    repeated image per class.
    """
    model = model if model is not None else _default_classifier()
    x, y = digits_arrays()
    ref_idx, gen_idx = split_digits(seed, 0.5)
    reference = digits_reference(model, x[ref_idx], y[ref_idx])
    gx, gy = x[gen_idx], y[gen_idx]
    low = gy < 5
    low_x, low_y = gx[low], gy[low]
    dropped_y = torch.cat([low_y, low_y + 5])
    first = torch.tensor([int(torch.nonzero(gy == c)[0, 0]) for c in gy.tolist()])
    sets: list[tuple[str, Tensor, Tensor]] = [
        ("real split", gx, gy),
        *[(f"noise sigma={s}", with_noise(gx, s, seed), gy) for s in (0.1, 0.3, 0.6)],
        ("half classes (0-4)", low_x, low_y),
        ("mode-dropped prompts (5-9 -> 0-4)", torch.cat([low_x, low_x]), dropped_y),
        ("one image per class", gx[first], gy),
    ]
    return [{"set": name, **score_digits(imgs, lab, model, reference).as_dict()} for name, imgs, lab in sets]


def format_table(rows: list[dict[str, float | int | str]]) -> str:
    """Render ``digits_sanity_table`` rows as a Markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)
