"""FID and KID over streamed features, and a reference-statistics store with manifests (evaluation.md sections 0, 8).

- ``FeatureStats`` accumulates float64 sums (n, sum, sum of outer products) so 30k images never sit in memory;
  shards from several processes combine by summation (``merge``, ``gather_stats``).
- ``fid`` is the Frechet distance of Heusel et al. 2017 through clean-fid's ``frechet_distance``; ``kid`` is the
  unbiased cubic-polynomial MMD^2 of Binkowski et al. 2018 through torchmetrics' ``poly_mmd``, on seeded subsets.
- ``save_reference`` / ``load_reference`` write and read ``<stem>.npz`` (mu, sigma, n, optional features) and
  ``<stem>.json`` (the manifest), atomically; ``check_compatible`` refuses statistics whose manifests differ in
  anything but ``n`` and ``created``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.metrics.digits import frechet_distance  # noqa: F401  (re-exported: clean-fid wrapper, scipy fallback)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from fewstep.metrics.features import FeatureExtractor

MANIFEST_IGNORED = ("n", "created")  # manifest keys that may differ between comparable statistics
_VERSION_PACKAGES = {"torch": "torch", "clean-fid": "clean-fid", "torchmetrics": "torchmetrics",
                     "open_clip": "open_clip_torch"}


# ----------------------------------------------------------------------------------------------- streaming stats


def _as_features(features: Tensor | np.ndarray) -> Tensor:
    """(N, d) float64 CPU tensor of features."""
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.dim() != 2:
        raise ValueError(f"expected features (N, d), got shape {tuple(f.shape)}")
    return f


class FeatureStats:
    """Streaming float64 accumulator of features: count ``n``, ``feature_sum`` (d,), ``outer_sum`` (d, d) and the
    first ``keep`` raw rows (for KID). Mean and covariance come from the sums alone, so memory is O(d^2).
    """

    def __init__(self, dim: int, keep: int = 0, n: int = 0, feature_sum: Tensor | None = None,
                 outer_sum: Tensor | None = None, kept: list[Tensor] | None = None) -> None:
        self.dim, self.keep, self.n = int(dim), int(keep), int(n)
        self.feature_sum = feature_sum if feature_sum is not None else torch.zeros(dim, dtype=torch.float64)
        self.outer_sum = outer_sum if outer_sum is not None else torch.zeros(dim, dim, dtype=torch.float64)
        self.kept: list[Tensor] = list(kept or [])

    @property
    def features(self) -> Tensor:
        """The kept raw features (k, dim), k <= keep."""
        return torch.cat(self.kept) if self.kept else torch.zeros(0, self.dim, dtype=torch.float64)

    def update(self, features: Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features (N, dim); returns ``self``."""
        f = _as_features(features)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d features, got {f.shape[1]}-d")
        self.n += f.shape[0]
        self.feature_sum += f.sum(dim=0)
        self.outer_sum += f.T @ f
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0 and len(f):
            self.kept.append(f[:room].clone())
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator equal to having seen this one's features, then ``other``'s."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d statistics")
        keep = max(self.keep, other.keep)
        kept = torch.cat([self.features, other.features])[:keep]
        return FeatureStats(self.dim, keep, self.n + other.n, self.feature_sum + other.feature_sum,
                            self.outer_sum + other.outer_sum,
                            [kept] if len(kept) else [])

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d) as float64 numpy, equal to ``np.mean`` / ``np.cov``."""
        if self.n < 2:
            raise FewstepError(f"need at least 2 images to estimate a covariance, got {self.n}: use more images")
        mu = self.feature_sum / self.n
        cov = (self.outer_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), ((cov + cov.T) / 2).numpy()

    def state_dict(self) -> dict[str, Tensor]:
        """Summable tensors (n as float64, feature_sum, outer_sum) plus the kept ``features`` and ``keep``."""
        return {"n": torch.tensor(float(self.n), dtype=torch.float64), "feature_sum": self.feature_sum.clone(),
                "outer_sum": self.outer_sum.clone(), "features": self.features, "keep": torch.tensor(self.keep)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> FeatureStats:
        """Rebuild an accumulator from ``state_dict()``."""
        s = state["feature_sum"].to("cpu", torch.float64)
        feats = state["features"].to("cpu", torch.float64)
        return cls(int(s.shape[0]), int(state["keep"]), int(round(float(state["n"]))), s.clone(),
                   state["outer_sum"].to("cpu", torch.float64).clone(), [feats] if len(feats) else [])


def gather_stats(stats: FeatureStats, accelerator: Accelerator) -> FeatureStats:
    """Combine the per-process accumulators of a distributed run: sums are all-reduced, kept features gathered.

    Every process gets the same combined statistics (kept features: concatenated in rank order, cut to ``keep``).
    """
    from accelerate.utils import gather_object

    sums = {"n": torch.tensor(float(stats.n), dtype=torch.float64), "feature_sum": stats.feature_sum,
            "outer_sum": stats.outer_sum}
    reduced = accelerator.reduce({k: v.to(accelerator.device) for k, v in sums.items()}, reduction="sum")
    kept = [torch.as_tensor(f) for f in gather_object([stats.features.numpy()])]
    feats = torch.cat(kept)[: stats.keep] if kept else stats.features
    return FeatureStats.from_state_dict({**{k: v.cpu() for k, v in reduced.items()}, "features": feats,
                                         "keep": torch.tensor(stats.keep)})


def extract_stats(extractor: FeatureExtractor, batches: Iterable[Tensor], keep: int = 0) -> FeatureStats:
    """Stream image batches through ``extractor`` into a ``FeatureStats`` keeping up to ``keep`` raw features."""
    stats = FeatureStats(extractor.dim, keep)
    for batch in batches:
        stats.update(extractor(batch))
    return stats


# ----------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Reference:
    """Stored reference statistics: mean, covariance, count, optional raw features and the manifest."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None
    manifest: dict[str, Any]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma)."""
        return self.mu, self.sigma


Moments = FeatureStats | Reference | tuple[Any, Any]


def _moments(x: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of a ``FeatureStats``, ``Reference`` or ``(mu, sigma)`` pair."""
    mu, sigma = x if isinstance(x, tuple) else x.mean_cov()
    return np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)


def fid(stats_a: Moments, stats_b: Moments) -> float:
    """Frechet Inception Distance (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    Inputs are ``FeatureStats``, ``Reference``s or ``(mu, sigma)`` pairs; two ``Reference``s must have compatible
    manifests (``check_compatible``). Computed by clean-fid's ``frechet_distance`` (``fewstep.metrics.digits``).
    """
    if isinstance(stats_a, Reference) and isinstance(stats_b, Reference):
        check_compatible(stats_a.manifest, stats_b.manifest)
    (mu_a, s_a), (mu_b, s_b) = _moments(stats_a), _moments(stats_b)
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape:
        raise FewstepError(f"cannot compare {mu_a.shape[0]}-d with {mu_b.shape[0]}-d statistics: use one extractor")
    return frechet_distance(mu_a, s_a, mu_b, s_b)


def _kept_features(x: Tensor | np.ndarray | FeatureStats | Reference) -> Tensor:
    """Raw features of a tensor/array, or the kept features of a ``FeatureStats`` / ``Reference``."""
    if isinstance(x, (FeatureStats, Reference)):
        f = x.features
        if f is None or len(f) == 0:
            raise FewstepError("KID needs raw features but these statistics kept none: rebuild them with keep=N")
        return _as_features(f)
    return _as_features(x)


def kid(
    feats_a: Tensor | np.ndarray | FeatureStats | Reference,
    feats_b: Tensor | np.ndarray | FeatureStats | Reference,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of the unbiased MMD^2 with kernel
    ``(x.y / d + 1)^3`` over ``subsets`` random subsets of ``subset_size`` rows of each set.

    Subsets are drawn without replacement by a ``torch.Generator`` seeded with ``seed`` (clean-fid's
    ``kernel_distance`` uses the global numpy RNG and returns no std); the MMD is torchmetrics' ``poly_mmd``.
    The std is over subsets (population std, as torchmetrics reports it).
    """
    from torchmetrics.image.kid import poly_mmd

    a, b = _kept_features(feats_a), _kept_features(feats_b)
    if a.shape[1] != b.shape[1]:
        raise FewstepError(f"cannot compare {a.shape[1]}-d with {b.shape[1]}-d features: use one extractor")
    if min(len(a), len(b)) < subset_size:
        raise FewstepError(f"KID subset_size={subset_size} exceeds the features available ({len(a)} and {len(b)}): "
                           "lower subset_size or keep more features")
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack([
        poly_mmd(a[torch.randperm(len(a), generator=gen)[:subset_size]],
                 b[torch.randperm(len(b), generator=gen)[:subset_size]])
        for _ in range(subsets)
    ])
    return float(scores.mean()), float(scores.std(unbiased=False))


# ----------------------------------------------------------------------------------------------- manifests


def hash_items(items: Iterable[str]) -> str:
    """Hex sha256 of a sequence of strings, in the given order (each encoded as UTF-8 and ended by a newline)."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def list_pngs(folder: str | Path) -> list[Path]:
    """The ``*.png`` files directly in ``folder``, sorted by name; ``FewstepError`` when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FewstepError(f"image folder not found: {root}; pass a folder of PNG images")
    files = sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".png"), key=lambda p: p.name)
    if not files:
        raise FewstepError(f"no PNG images in {root}: write the images as .png files there")
    return files


def hash_folder(folder: str | Path) -> str:
    """Reference-list hash of an image folder: ``hash_items`` of ``"<name>\\t<size>"`` over its sorted PNGs."""
    return hash_items(f"{p.name}\t{p.stat().st_size}" for p in list_pngs(folder))


def library_versions() -> dict[str, str]:
    """Versions of torch, clean-fid, torchmetrics, open_clip and fewstep, for manifests."""
    import fewstep

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {**{k: version(d) for k, d in _VERSION_PACKAGES.items()}, "fewstep": fewstep.__version__}


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so fresh and loaded manifests compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def manifest_for(extractor: FeatureExtractor, protocol: str, reference_hash: str, n: int = 0) -> dict[str, Any]:
    """Manifest for statistics from ``extractor`` under ``protocol`` over the reference list ``reference_hash``."""
    info = extractor.describe()
    return _jsonable({
        "protocol": protocol,
        "extractor": info["id"],
        "extractor_weights_sha256": info["weights_sha256"],
        "feature_dim": info["dim"],
        "preprocess": info["preprocess"],
        "reference_sha256": reference_hash,
        "n": int(n),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def check_compatible(manifest_a: dict[str, Any], manifest_b: dict[str, Any]) -> None:
    """Raise ``FewstepError`` naming the first key (dotted for nested keys) where the manifests differ.

    Only ``n`` and ``created`` may differ; everything else, library versions included, must match.
    """
    a, b = _flatten(_jsonable(manifest_a)), _flatten(_jsonable(manifest_b))
    missing = object()
    for key in list(a) + [k for k in b if k not in a]:
        if key.split(".")[0] in MANIFEST_IGNORED:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "<missing>" if v is missing else repr(v)  # noqa: E731
            raise FewstepError(f"statistics are not comparable: manifest key {key!r} differs ({show(va)} vs "
                               f"{show(vb)}): recompute the reference with the same protocol and extractor")


# ----------------------------------------------------------------------------------------------- store


def _stem_paths(path_stem: str | Path) -> tuple[Path, Path]:
    """(``<stem>.npz``, ``<stem>.json``); a given ``.npz``/``.json`` suffix is dropped first."""
    stem = Path(path_stem)
    if stem.suffix in (".npz", ".json"):
        stem = stem.with_suffix("")
    return stem.parent / f"{stem.name}.npz", stem.parent / f"{stem.name}.json"


def _atomic_write(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``target`` through a temporary file in the same folder, then rename it; no temp file survives."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_reference(path_stem: str | Path, stats: FeatureStats, manifest: dict[str, Any],
                   features: bool = True) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (mu, sigma, n and, if kept and ``features``, the raw features) and ``<stem>.json``.

    The manifest's ``n`` is set to ``stats.n``. Both files are written atomically, the npz first.
    """
    npz, js = _stem_paths(path_stem)
    mu, sigma = stats.mean_cov()
    arrays = {"mu": mu, "sigma": sigma, "n": np.array(stats.n, dtype=np.int64)}
    if features and stats.kept:
        arrays["features"] = stats.features.numpy()
    payload = json.dumps(_jsonable({**manifest, "n": stats.n}), indent=2, sort_keys=True).encode() + b"\n"
    _atomic_write(npz, lambda f: np.savez(f, **arrays))
    _atomic_write(js, lambda f: f.write(payload))
    return npz, js


def load_reference(path_stem: str | Path) -> Reference:
    """Read statistics written by ``save_reference``."""
    npz, js = _stem_paths(path_stem)
    for p in (npz, js):
        if not p.is_file():
            raise FewstepError(f"reference statistics not found: {p}; build them first (save_reference)")
    manifest = json.loads(js.read_text())
    with np.load(npz, allow_pickle=False) as data:
        ref = Reference(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]),
                        features=data["features"] if "features" in data.files else None, manifest=manifest)
    if manifest.get("n") != ref.n:
        raise FewstepError(f"{js} says n={manifest.get('n')} but {npz} holds n={ref.n}: rebuild the reference")
    return ref


# ----------------------------------------------------------------------------------------------- folders


def _png_batches(files: list[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 [B, 3, H, W] batches of the given PNG files (RGB), in order."""
    from PIL import Image

    for i in range(0, len(files), batch_size):
        arrays = []
        for p in files[i: i + batch_size]:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise FewstepError(f"images in {files[0].parent} have different sizes {sorted(shapes)}: "
                               "resize them to the protocol's resolution first")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_folder_stats(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 64,
                       keep: int = 0) -> FeatureStats:
    """Stream the PNGs of ``folder`` (sorted by name) through ``extractor`` into a ``FeatureStats``."""
    return extract_stats(extractor, _png_batches(list_pngs(folder), batch_size), keep=keep)
