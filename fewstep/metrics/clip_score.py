"""CLIP score on open_clip, with differentiable tensor preprocessing (evaluation.md sections 0.4, 3 and 6.5).

CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning") is the
cosine similarity between the CLIP embeddings of an image and its prompt. Papers report it under different
conventions, so a ``ClipScorer`` always records the one it uses (``describe()``):

* ``"100cos"`` (default): ``100 * cos`` per sample, as torchmetrics ``CLIPScore`` and LCM-style tables report
  it (about 30 for good text-image pairs on large CLIPs). No per-sample clamp; torchmetrics clamps only the
  *mean* at 0.
* ``"cos"``: raw cosine, the DMD2 / GigaGAN / InstaFlow protocol (open_clip ViT-g-14 ``laion2b_s12b_b42k``,
  prompt prefix "A photo depicts ", about 0.30-0.34); see ``ClipScorer.dmd2_protocol``.
* ``"hessel"``: ``2.5 * max(cos, 0)``, the per-sample clamp of Hessel et al. (w = 2.5).

Weights are never downloaded by fewstep itself: ``pretrained`` is a local checkpoint file or an open_clip tag.
A tag resolves through open_clip's download/cache logic, except when ``HF_HUB_OFFLINE=1``, where only an already
cached file is used and anything else fails fast with a ``FewstepError`` asking for a local file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.errors import FewstepError

SCALES = ("100cos", "cos", "hessel")
DMD2_MODEL, DMD2_TAG, DMD2_PREFIX = "ViT-g-14", "laion2b_s12b_b42k", "A photo depicts "
_TRUE = {"1", "on", "yes", "true"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}

Tokenizer = Callable[[list[str]], Tensor]


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value in the environment."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def apply_scale(cos: Tensor, scale: str) -> Tensor:
    """Map per-sample cosines to a reporting convention: "100cos" -> 100 cos, "cos" -> cos,
    "hessel" -> 2.5 max(cos, 0) (Hessel et al. 2021)."""
    if scale == "100cos":
        return 100.0 * cos
    if scale == "cos":
        return cos
    if scale == "hessel":
        return 2.5 * cos.clamp_min(0.0)
    raise FewstepError(f"unknown CLIP score scale {scale!r}; use one of {', '.join(SCALES)}")


# ----------------------------------------------------------------------------------------------------------------
# differentiable preprocessing


def _resize(images: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    """Resize float images to ``size`` (antialiased for bilinear/bicubic); a no-op at the same size."""
    if tuple(images.shape[-2:]) == size:
        return images
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest", "area") else "bicubic"
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(images, size=size, mode=mode)


def _center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Centre crop (N, C, H, W) to ``size`` (H >= size[0], W >= size[1])."""
    h, w = images.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return images[..., top:top + size[0], left:left + size[1]]


def resize_center_crop(images: Tensor, resize_to: int, crop: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """Resize the shorter side to ``resize_to`` (aspect kept), then centre crop to ``crop`` (torch, differentiable).

    This is what the PIL transforms of open_clip (``resize_mode="shortest"``) and transformers'
    ``CLIPImageProcessor`` do; values are clamped to [0, 1] afterwards, as a uint8 round trip would.
    """
    h, w = images.shape[-2:]
    short = min(h, w)
    new = (max(crop[0], round(h * resize_to / short)), max(crop[1], round(w * resize_to / short)))
    return _center_crop(_resize(images, new, interpolation), crop).clamp(0.0, 1.0)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (h, w) pair as an (h, w) tuple."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def preprocess_images(images: Tensor, cfg: dict[str, Any]) -> Tensor:
    """Differentiable version of open_clip's eval transform for float images (N, 3, H, W) in [0, 1].

    ``cfg`` is an open_clip preprocess config (``open_clip.get_model_preprocess_cfg``): size, mean, std,
    interpolation and resize_mode ("shortest": resize + centre crop; "squash": plain resize; "longest":
    resize the longer side and pad with ``fill_color``).
    """
    size = _as_size(cfg.get("size", 224))
    interpolation = str(cfg.get("interpolation", "bicubic"))
    mode = cfg.get("resize_mode", "shortest")
    if mode == "squash":
        x = _resize(images, size, interpolation).clamp(0.0, 1.0)
    elif mode == "longest":
        h, w = images.shape[-2:]
        ratio = min(size[0] / h, size[1] / w)
        x = _resize(images, (round(h * ratio), round(w * ratio)), interpolation).clamp(0.0, 1.0)
        ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
        fill = float(cfg.get("fill_color", 0)) / 255.0
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    else:
        x = resize_center_crop(images, min(size), size, interpolation)
    mean = torch.tensor(cfg["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def check_images(images: Tensor, n_prompts: int | None = None) -> Tensor:
    """Validate float images (N, 3 or 1, H, W) in [0, 1] (grey is repeated to RGB) against the prompt count."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not torch.is_floating_point(images):
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if n_prompts is not None and n_prompts != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {n_prompts} prompts")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ----------------------------------------------------------------------------------------------------------------
# loading open_clip models from local files


def _model_cfg_from_json(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg overrides) from an open_clip architecture JSON (``model_configs/*.json`` layout)
    or an ``open_clip_config.json``-style file with ``model_cfg`` / ``preprocess_cfg`` sections."""
    data = json.loads(path.read_text(encoding="utf-8"))
    cfg = dict(data.get("model_cfg", data))
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise FewstepError(f"{path} is not an open_clip model config (missing {', '.join(missing)})")
    if cfg.pop("custom_text", False) or "multimodal_cfg" in cfg:
        raise FewstepError(f"{path}: only plain open_clip CLIP configs (no custom_text / CoCa) are supported")
    return cfg, dict(data.get("preprocess_cfg", {}))


def _tag_checkpoint(model_name: str, tag: str, cache_dir: str | None) -> str:
    """Local path of open_clip tag ``tag`` (downloading through open_clip only when not offline)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hint = (f"download the weights yourself (e.g. hf {cfg.get('hf_hub') or cfg.get('url')}) and pass the local "
            "file as pretrained=<path>")
    if hub_offline():
        from huggingface_hub import constants

        url = cfg.get("url", "")
        cached = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url)) if url else ""
        if not (cfg.get("hf_hub") and constants.HF_HUB_OFFLINE) and not os.path.isfile(cached):
            raise FewstepError(f"open_clip tag {model_name}/{tag} is not cached and HF_HUB_OFFLINE=1; {hint}")
    try:
        return str(download_pretrained(cfg, cache_dir=cache_dir))
    except Exception as exc:  # huggingface_hub / urllib errors vary by version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " (HF_HUB_OFFLINE=1)" if hub_offline() else ""
        raise FewstepError(f"cannot get weights for open_clip tag {model_name}/{tag}{offline}: {first}; "
                           f"{hint}") from exc


def _model_from_json(
    path: Path, checkpoint: str | None, device: str | torch.device, precision: str, weights_only: bool
) -> nn.Module:
    """Build ``open_clip.CLIP`` from a config JSON and load ``checkpoint`` (strict) with open_clip's loader."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg, pp_overrides = _model_cfg_from_json(path)
    if precision not in _DTYPES:
        raise FewstepError(f"unknown precision {precision!r}; use one of {', '.join(_DTYPES)}")
    model = open_clip.CLIP(**cfg)
    if checkpoint is not None:
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=weights_only)
    pp = merge_preprocess_dict(PreprocessCfg(), pp_overrides)
    pp["size"] = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, pp)
    return model.to(device=device, dtype=_DTYPES[precision])


def load_open_clip(
    model_name: str | Path,
    pretrained: str | Path | None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
    force_quick_gelu: bool = False,
    weights_only: bool = True,
) -> tuple[nn.Module, str | None]:
    """Create an open_clip model in eval mode and return it with the path of the checkpoint it loaded.

    ``model_name``: a built-in open_clip architecture ("ViT-H-14", "ViT-L-14-quickgelu", ...) or the path of an
    open_clip config JSON (used for fewstep's micro-CLIP and for tiny test models). ``pretrained``: a local
    checkpoint file (open_clip's loader: torch state dicts, ``{"state_dict": ...}``, safetensors, OpenAI JIT
    archives; strict), an open_clip tag (see the module docstring for the offline rule), or None for a random
    init. ``weights_only=False`` allows pickled (non-tensor) content in a trusted torch checkpoint. Problems are
    raised as ``FewstepError`` with the fix.
    """
    import open_clip

    name = str(model_name)
    is_json = name.endswith(".json")
    if is_json and not Path(name).is_file():
        raise FewstepError(f"open_clip model config not found: {name}")
    if not is_json and name not in open_clip.list_models():
        raise FewstepError(f"unknown open_clip model {name!r}; pass a built-in architecture (open_clip.list_models(), "
                           "e.g. ViT-H-14, ViT-L-14-quickgelu, ViT-g-14) or a config JSON path")
    checkpoint: str | None = None
    tag: str | None = None
    if pretrained is not None:
        pre = str(pretrained)
        if os.path.isfile(pre):
            checkpoint = pre
        elif not is_json and open_clip.get_pretrained_cfg(name, pre):
            tag, checkpoint = pre, _tag_checkpoint(name, pre, cache_dir)
        else:
            tags = [] if is_json else open_clip.list_pretrained_tags_by_model(name)
            raise FewstepError(f"pretrained {pre!r} is neither an existing file nor an open_clip tag of {name} "
                               f"(tags: {', '.join(tags) or 'none'}); pass the path of a local checkpoint file")
    try:
        if is_json:
            model = _model_from_json(Path(name), checkpoint, device, precision, weights_only)
        else:
            model = open_clip.create_model(name, pretrained=tag or checkpoint, precision=precision, device=device,
                                           force_quick_gelu=force_quick_gelu, cache_dir=cache_dir,
                                           weights_only=weights_only)
    except FewstepError:
        raise
    except pickle.UnpicklingError as exc:
        raise FewstepError(f"{checkpoint} holds pickled objects that torch.load(weights_only=True) refuses; if you "
                           "trust the file, pass weights_only=False") from exc
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FewstepError(f"cannot load {checkpoint} into open_clip {name}: {first}; check that the file is a "
                           f"checkpoint of this architecture") from exc
    model.eval().requires_grad_(False)
    return model, checkpoint


def _default_tokenizer(model_name: str, model: nn.Module) -> Tokenizer:
    """open_clip's tokenizer for a built-in architecture, or a SimpleTokenizer at the model's context length."""
    import open_clip

    context = open_clip.get_model_tokenize_cfg(model).get("context_length")
    if model_name.endswith(".json"):
        return open_clip.SimpleTokenizer(context_length=context or 77)
    return open_clip.get_tokenizer(model_name, context_length=context)


# ----------------------------------------------------------------------------------------------------------------
# the scorer


class ClipScorer(nn.Module):
    """Per-sample CLIP score of images against prompts with a frozen open_clip model (Hessel et al. 2021).

    ``score(images, prompts)`` takes float images (N, 3, H, W) in [0, 1], resizes them to the model's input size
    on tensors (bicubic + antialias, centre crop), normalises with the model's mean/std and returns a (N,)
    tensor in the ``scale`` convention. Gradients flow to ``images``; text is encoded without gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        pretrained: str | None,
        checkpoint_path: str | None = None,
        scale: str = "100cos",
        prompt_prefix: str = "",
    ) -> None:
        super().__init__()
        import open_clip

        apply_scale(torch.zeros(1), scale)  # validates the scale name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name, self.pretrained, self.checkpoint_path = model_name, pretrained, checkpoint_path
        self.scale, self.prompt_prefix = scale, prompt_prefix
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self._sha256: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | Path,
        pretrained: str | Path,
        *,
        scale: str = "100cos",
        prompt_prefix: str = "",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | None = None,
        force_quick_gelu: bool = False,
        weights_only: bool = True,
    ) -> "ClipScorer":
        """Build from an open_clip architecture (or config JSON) and a local checkpoint file or tag."""
        model, ckpt = load_open_clip(model_name, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                                     force_quick_gelu=force_quick_gelu, weights_only=weights_only)
        tokenizer = _default_tokenizer(str(model_name), model)
        return cls(model, tokenizer, model_name=str(model_name), pretrained=str(pretrained), checkpoint_path=ckpt,
                   scale=scale, prompt_prefix=prompt_prefix)

    @classmethod
    def dmd2_protocol(cls, pretrained: str | Path = DMD2_TAG, **kwargs: Any) -> "ClipScorer":
        """The DMD2/GigaGAN CLIP score: open_clip ViT-g-14 laion2b_s12b_b42k, raw cosine, "A photo depicts "."""
        kwargs.setdefault("scale", "cos")
        kwargs.setdefault("prompt_prefix", DMD2_PREFIX)
        return cls.from_pretrained(DMD2_MODEL, pretrained, **kwargs)

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def preprocess(self, images: Tensor) -> Tensor:
        """Differentiable resize / crop / normalise of [0, 1] images to the model input (``preprocess_images``)."""
        p = self._param()
        x = check_images(images).to(device=p.device, dtype=torch.float32)
        return preprocess_images(x, self.preprocess_cfg).to(p.dtype)

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings (N, D), differentiable w.r.t. ``images``."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (N, D) of ``prompt_prefix + prompt`` (no gradients)."""
        tokens = self.tokenizer([self.prompt_prefix + p for p in prompts]).to(self._param().device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-sample cosine similarity (N,) between each image and its prompt."""
        check_images(images, len(prompts))
        return (self.encode_images(images) * self.encode_prompts(list(prompts))).sum(dim=-1)

    def score(self, images: Tensor, prompts: Sequence[str], scale: str | None = None) -> Tensor:
        """Per-sample CLIP score (N,) in ``scale`` (default: the scorer's own convention)."""
        return apply_scale(self.cosine(images, prompts), scale or self.scale)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Same as ``score(images, prompts)``."""
        return self.score(images, prompts)

    @torch.no_grad()
    def mean_score(self, images: Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
        """Mean per-sample score over a large set, in batches and without gradients (no clamp of the mean)."""
        total = 0.0
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            total += float(self.score(images[chunk], prompts[chunk]).sum())
        return total / max(len(prompts), 1)

    def weights_sha256(self) -> str | None:
        """SHA-256 of the loaded checkpoint file (computed once), or None for a random init."""
        if self._sha256 is None and self.checkpoint_path is not None:
            self._sha256 = sha256_file(self.checkpoint_path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """What a report must state: model, pretrained (tag or file), scale, prompt prefix and weight hash."""
        return {"model": self.model_name, "pretrained": self.pretrained, "scale": self.scale,
                "prompt_prefix": self.prompt_prefix, "weights_sha256": self.weights_sha256()}
