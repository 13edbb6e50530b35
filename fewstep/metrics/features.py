"""Feature extractors for FID/KID: clean-fid's Inception, an open_clip image tower and the offline digits CNN
and MLP (two independent digits feature spaces).

Every extractor has an ``id``, the ``weights_sha256`` of its weights, a ``preprocess`` dict and the feature
``dim``; these go into the reference-statistics manifest (evaluation.md sections 0 and 8), so statistics from
different extractors or preprocessing are never compared. Calling an extractor on images [N, C, H, W]
(C in {1, 3}; float in [0, 1] or uint8) returns float64 features (N, dim) on the CPU.

Float images are first rounded to uint8 (``round(x * 255)``, as diffusers does when it saves PNGs), so features
of in-memory images equal the features of the same images written to and read back from PNG files.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError

INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid's InceptionV3W loads from its folder
INCEPTION_ENV = "FEWSTEP_INCEPTION_WEIGHTS"  # env var: the Inception file or the folder holding it


# ----------------------------------------------------------------------------------------------- hashing


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a large weights file is hashed once per process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cached while the file's size and mtime are unchanged)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_of(str(p), st.st_size, st.st_mtime_ns)


def state_dict_sha256(module: nn.Module) -> str:
    """Hex sha256 over a module's state dict (names, dtypes, shapes and raw bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- input


def to_uint8_nchw(images: Tensor | np.ndarray) -> Tensor:
    """Convert [N, C, H, W] images (C in {1, 3}; float in [0, 1] or uint8) to a uint8 CPU tensor [N, 3, H, W].

    Floats are clamped to [0, 1] and rounded as ``round(x * 255)``; one channel is repeated to three.
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] with C in (1, 3), got shape {tuple(x.shape)}")
    if torch.is_floating_point(x):
        x = (x.double().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise ValueError(f"expected float images in [0, 1] or uint8 images, got dtype {x.dtype}")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _nhwc_numpy(images: Tensor) -> np.ndarray:
    """uint8 [N, 3, H, W] tensor -> uint8 numpy [N, H, W, 3] (the layout PIL and clean-fid's resizer use)."""
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------------------------- base


class FeatureExtractor(ABC):
    """A frozen image embedding for Frechet/kernel distances.

    Attributes:
        id: extractor name recorded in manifests, e.g. ``inception-v3-clean``, ``clip-ViT-B-32/openai``.
        preprocess: JSON-able description of the input pipeline (size, resize filter, crop, range).
        dim: feature dimension.
        weights_sha256: sha256 of the weights (property; computed lazily and cached).
    """

    id: str
    preprocess: dict[str, Any]
    dim: int

    @property
    @abstractmethod
    def weights_sha256(self) -> str:
        """Hex sha256 identifying the weights."""

    @abstractmethod
    def _features(self, images: Tensor) -> Tensor:
        """Features (N, dim) of uint8 images [N, 3, H, W]."""

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        """Return float64 CPU features (N, dim) of images [N, C, H, W] (float in [0, 1] or uint8)."""
        x = to_uint8_nchw(images)
        with torch.inference_mode():
            return self._features(x).detach().to("cpu", torch.float64)

    def describe(self) -> dict[str, Any]:
        """The extractor's manifest fields: id, weights_sha256, preprocess and dim."""
        return {"id": self.id, "weights_sha256": self.weights_sha256, "preprocess": dict(self.preprocess),
                "dim": self.dim}


def _first_line(e: BaseException, limit: int = 200) -> str:
    """First line of an exception message, cut to ``limit`` characters (its type name when empty)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- Inception


def _inception_url() -> str:
    """The URL clean-fid downloads its TorchScript Inception from (read from the installed clean-fid)."""
    from cleanfid.downloads_helper import inception_url

    return inception_url


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """Return the local ``inception-2015-12-05.pt``: ``weights`` (file or folder), else ``$FEWSTEP_INCEPTION_WEIGHTS``.

    Never downloads; a missing file raises ``FewstepError`` naming the file, the env var and clean-fid's URL.
    """
    given = weights if weights is not None else os.environ.get(INCEPTION_ENV)
    how = (f"download {INCEPTION_FILE} from {_inception_url()} and pass its path (or folder) as the Inception "
           f"weights or set {INCEPTION_ENV}; fewstep never downloads it")
    if not given:
        raise FewstepError(f"no Inception weights given: {how}")
    path = Path(given).expanduser()
    path = path / INCEPTION_FILE if path.is_dir() else path
    if not path.is_file():
        raise FewstepError(f"Inception weights not found at {path}: {how}")
    if path.name != INCEPTION_FILE:
        raise FewstepError(f"Inception weights must be named {INCEPTION_FILE} (clean-fid loads that name from its "
                           f"folder), got {path}: rename the file")
    return path


class InceptionExtractor(FeatureExtractor):
    """clean-fid's "clean" FID features (Parmar et al. 2022): PIL bicubic float resize to 299, TorchScript InceptionV3.

    The network is the StyleGAN2-ADA TorchScript export of the TF 2015-12-05 Inception (Szegedy et al. 2016) used
    for FID by Heusel et al. 2017, wrapped by ``cleanfid.inception_torchscript.InceptionV3W`` (pool3, 2048-d), and
    loaded from a local file only (see ``resolve_inception_weights``).
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.path = resolve_inception_weights(weights)
        try:  # InceptionV3W takes the folder and joins INCEPTION_FILE itself
            model = InceptionV3W(str(self.path.parent), download=False, resize_inside=False)
        except (RuntimeError, ValueError, OSError) as e:
            raise FewstepError(f"cannot load {self.path} as TorchScript ({_first_line(e)}): re-download it from "
                               f"{_inception_url()}") from e
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.resize: Callable[[np.ndarray], np.ndarray] = build_resizer("clean")
        self.id = "inception-v3-clean"
        self.dim = 2048
        self.preprocess = {"size": 299, "resize": "bicubic", "resize_impl": "PIL float32 per channel (clean-fid clean)",
                           "crop": "none", "input": "uint8 RGB", "range": "[0,255] -> (x-128)/128"}

    @property
    def weights_sha256(self) -> str:
        """sha256 of the local Inception file."""
        return file_sha256(self.path)

    def _features(self, images: Tensor) -> Tensor:
        """Clean-resize each uint8 image to 299x299 float [0, 255] and return pool3 features (N, 2048)."""
        resized = np.stack([self.resize(im) for im in _nhwc_numpy(images)])  # N, 299, 299, 3 float32
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(self.device)
        return self.model(x)


# ----------------------------------------------------------------------------------------------- CLIP


class ClipExtractor(FeatureExtractor):
    """L2-normalised open_clip image-tower embeddings (Radford et al. 2021; "CLIP-FID", Kynkäänniemi et al. 2023).

    ``pretrained`` is an open_clip tag (resolved through open_clip's own cache; set ``HF_HUB_OFFLINE=1`` to forbid
    downloads) or a local checkpoint file. ``model`` passes an already built open_clip model instead (its
    ``visual.preprocess_cfg`` is used when present, otherwise open_clip's defaults at its image size); its
    weights hash is then taken over the state dict. Images go through open_clip's inference transform (PIL).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | Path | None = None,
        *,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
    ) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.device = torch.device(device)
        if ":" not in model_name:  # no hf-hub:/local-dir: schema: open_clip's spelling, ViT-B/32 -> ViT-B-32
            model_name = model_name.replace("/", "-")
        self.model_name = model_name
        self.cache_dir = cache_dir
        self.pretrained = str(pretrained) if pretrained is not None else None
        if model is None:
            if self.pretrained is None:
                raise FewstepError(f"CLIP features need trained weights: pass pretrained=<open_clip tag or local "
                                   f"checkpoint file> for {model_name}")
            model = self._create(model_name, self.pretrained, cache_dir)
            tag = Path(self.pretrained).name if os.path.isfile(self.pretrained) else self.pretrained
        else:
            tag = "in-memory"
        cfg = dict(getattr(model.visual, "preprocess_cfg", None) or
                   {**asdict(PreprocessCfg()), "size": getattr(model.visual, "image_size", 224)})
        self.model = model.to(self.device).eval()
        self.transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        self.id = f"clip-{model_name}/{tag}"
        self.dim = _output_dim(self.model, cfg["size"], self.device)
        self.preprocess = {"size": _json_size(cfg["size"]), "resize": cfg["interpolation"],
                           "resize_mode": cfg["resize_mode"],
                           "crop": "center" if cfg["resize_mode"] == "shortest" else cfg["resize_mode"],
                           "mean": list(cfg["mean"]), "std": list(cfg["std"]), "input": "uint8 RGB via PIL",
                           "range": "[0,1] then (x-mean)/std", "normalize": "l2"}

    @staticmethod
    def _create(model_name: str, pretrained: str, cache_dir: str | None) -> nn.Module:
        """Build the open_clip model, turning open_clip's errors into one-line ``FewstepError``s."""
        import open_clip

        if ":" not in model_name and model_name not in open_clip.list_models():  # hf-hub:/local-dir: pass through
            raise FewstepError(f"unknown open_clip model {model_name!r}: pick one of open_clip.list_models()")
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise FewstepError(f"cannot build open_clip {model_name} with pretrained={pretrained} ({_first_line(e)}): "
                               "pass a local checkpoint file or a tag from open_clip.list_pretrained()") from e

    @functools.cached_property
    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file (tags: open_clip's cached file), or of the state dict for ``model=``."""
        if self.pretrained is None:
            return state_dict_sha256(self.model)
        if os.path.isfile(self.pretrained):
            return file_sha256(self.pretrained)
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(self.model_name, self.pretrained)
        path = download_pretrained(cfg, cache_dir=self.cache_dir) if cfg else ""
        return file_sha256(path) if path and os.path.isfile(path) else state_dict_sha256(self.model)

    def _features(self, images: Tensor) -> Tensor:
        """Apply open_clip's inference transform per image and return unit-norm image embeddings."""
        from PIL import Image

        x = torch.stack([self.transform(Image.fromarray(im)) for im in _nhwc_numpy(images)]).to(self.device)
        return self.model.encode_image(x, normalize=True)


def _json_size(size: int | tuple[int, int] | list[int]) -> int | list[int]:
    """An open_clip image size as JSON: an int for square sizes, else [h, w]."""
    if isinstance(size, int):
        return size
    h, w = (int(v) for v in size)
    return h if h == w else [h, w]


def _output_dim(model: nn.Module, size: int | tuple[int, int] | list[int], device: torch.device) -> int:
    """Image-embedding width of an open_clip model: ``visual.output_dim``, else one dummy forward pass."""
    dim = getattr(model.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *hw, device=device)).shape[1])


# ----------------------------------------------------------------------------------------------- digits


class DigitsExtractor(FeatureExtractor):
    """The shipped offline ``DigitsNet`` embedding (32-d), reported as ``fid[digits-cnn]`` (evaluation.md section 7).

    Images are reduced to grey (channel mean) and area-downsampled to 8x8 by ``fewstep.metrics.digits``.
    """

    extractor_id = "digits-cnn"
    arch = "DigitsNet"
    default_weights = "DEFAULT_WEIGHTS"  # attribute of fewstep.metrics.digits

    def __init__(self, weights: str | Path | None = None) -> None:
        from fewstep.metrics import digits

        self.path = Path(weights) if weights is not None else getattr(digits, self.default_weights)
        try:
            self.model = digits.load_digits_classifier(self.path)
        except (FileNotFoundError, ValueError) as e:
            raise FewstepError(f"{e}") from e
        if type(self.model).__name__ != self.arch:
            raise FewstepError(f"{self.path} holds a {type(self.model).__name__}, but extractor {self.extractor_id} "
                               f"needs {self.arch} weights")
        self.id = self.extractor_id
        self.dim = self.model.num_features
        self.preprocess = {"size": 8, "resize": "area", "crop": "none", "input": "uint8, grey = mean of RGB",
                           "range": "[0,1]"}

    @property
    def weights_sha256(self) -> str:
        """sha256 of the safetensors weights file."""
        return file_sha256(self.path)

    def _features(self, images: Tensor) -> Tensor:
        """DigitsNet embeddings (N, 32) (``DigitsMLP``: (N, 64))."""
        from fewstep.metrics.digits import digits_features

        return digits_features(self.model, images)[0]


class DigitsMLPExtractor(DigitsExtractor):
    """The second shipped offline digits embedding: ``DigitsMLP`` (64-d penultimate layer), ``fid[digits-mlp]``.

    A different architecture (fully connected, no convolutions) trained on a different split
    (``split_digits(seed=1, 0.2)``; the CNN uses seed 0) by ``scripts/train_digits_classifier.py --arch mlp``;
    same 8x8 grey preprocessing as ``DigitsExtractor``. Its own id and weights hash go into every manifest, so its
    statistics are never compared with the CNN's.
    """

    extractor_id = "digits-mlp"
    arch = "DigitsMLP"
    default_weights = "MLP_WEIGHTS"


# ----------------------------------------------------------------------------------------------- registry

EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": InceptionExtractor,
    "clip": ClipExtractor,
    "digits": DigitsExtractor,
    "digits-mlp": DigitsMLPExtractor,
}


def build_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build a registered extractor by name (``inception``, ``clip``, ``digits``, ``digits-mlp``); ``kwargs`` go to its
    class."""
    try:
        factory = EXTRACTORS[name]
    except KeyError:
        raise FewstepError(f"unknown feature extractor {name!r}: use one of {', '.join(sorted(EXTRACTORS))}") from None
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise FewstepError(f"feature extractor {name!r} has no option {unknown[0]!r}: use {', '.join(params)}")
    return factory(**kwargs)
