"""Reward models for evaluation and reward-tilted distillation (evaluation.md section 6).

Every reward follows ``RewardFn``: ``reward(images, prompts) -> Tensor (N,)`` for float images (N, 3, H, W) in
[0, 1], with preprocessing done on tensors so gradients reach the images (section 6.5). Real rewards load only
local files; a missing file raises ``FewstepError`` naming the file and where to download it (section 9).

* ``HPSv21Reward``: Human Preference Score v2.1 (Wu et al. 2023, "Human Preference Score v2"): open_clip
  ViT-H-14 with the HPS checkpoint (same state-dict layout, under "state_dict"); score = cosine of the
  normalised image and text embeddings, no logit scale (typically 0.25-0.33).
* ``PickScoreReward``: PickScore v1 (Kirstain et al. 2023, "Pick-a-Pic"): transformers ``CLIPModel``;
  score = ``logit_scale.exp() * cos`` (about 20-23).
* ``AestheticReward``: LAION aesthetic predictor v2 (C. Schuhmann, "improved-aesthetic-predictor"): linear MLP
  768-1024-128-64-16-1 on L2-normalised OpenAI CLIP ViT-L/14 image embeddings; prompts are ignored.
* ``DigitsClassReward`` (offline): log-probability (or probability) of the prompted class under the shipped
  digits classifier; prompts "a handwritten digit {d}".
* ``MicroClipReward`` (offline): CLIP score of the shipped micro-CLIP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.metrics.clip_score import ClipScorer, check_images, resize_center_crop, sha256_file

HPS_URL = "https://huggingface.co/xswu/HPSv2 (file {file})"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
PICKSCORE_MODEL_URL = "https://huggingface.co/yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_URL = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CLIP_L14_URL = ("https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt "
                "(or hf timm/vit_large_patch14_clip_224.openai)")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class RewardFn(Protocol):
    """A reward: ``__call__(images (N, 3, H, W) float in [0, 1], prompts) -> (N,)``, plus metadata."""

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-sample reward (N,)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Everything a report needs to identify the reward (model, files, hashes, formula)."""
        ...


def _require_path(path: str | Path | None, what: str, source: str, kind: str = "file") -> Path:
    """``path`` as a Path if it is an existing file (``kind="file"``) or folder (``kind="folder"``), else one
    ``FewstepError`` naming what is missing and where to download it."""
    if path is None:
        raise FewstepError(f"{what}: no {kind} given; download it from {source} and pass its local path")
    p = Path(path).expanduser()
    if not (p.is_file() if kind == "file" else p.is_dir()):
        raise FewstepError(f"{what} {kind} not found: {p}; download it from {source} and pass its local path")
    return p


class _Frozen(nn.Module):
    """Base of the adapters: eval mode, no parameter gradients, ``describe()`` with name and differentiability."""

    name: str = ""
    differentiable: bool = True

    def freeze(self) -> None:
        """Put every submodule in eval mode and stop gradients to the parameters (images still get them)."""
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "_Frozen":
        """Rewards always stay in eval mode (no dropout), whatever the caller's module does."""
        return super().train(False)


class HPSv21Reward(_Frozen):
    """HPS v2.1 (Wu et al. 2023): cosine between open_clip ViT-H-14 embeddings of image and prompt.

    ``checkpoint``: local ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``, ViT-H-14 key layout; loaded
    strictly by open_clip's loader). ``version="v2.0"`` takes ``HPS_v2_compressed.pt`` the same way.
    ``model_name`` may be a config JSON path (tests use a tiny one).
    """

    differentiable = True

    def __init__(
        self,
        checkpoint: str | Path | None,
        *,
        version: str = "v2.1",
        model_name: str | Path = "ViT-H-14",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        weights_only: bool = True,
    ) -> None:
        super().__init__()
        if version not in HPS_FILES:
            raise FewstepError(f"unknown HPS version {version!r}; use one of {', '.join(HPS_FILES)}")
        file = HPS_FILES[version]
        path = _require_path(checkpoint, f"HPS{version} checkpoint {file}", HPS_URL.format(file=file))
        self.name, self.version = f"hps{version}", version
        self.clip = ClipScorer.from_pretrained(model_name, path, scale="cos", device=device, precision=precision,
                                               weights_only=weights_only)
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """HPS (N,): cos(image, prompt) of the normalised embeddings."""
        return self.clip.cosine(images, prompts)

    def describe(self) -> dict[str, Any]:
        """Name, architecture, checkpoint path and SHA-256, formula."""
        clip = self.clip.describe()
        return {"name": self.name, "differentiable": self.differentiable, "model": clip["model"],
                "checkpoint": clip["pretrained"], "weights_sha256": clip["weights_sha256"],
                "formula": "cos(image, text)"}


def _image_processor_cfg(folder: Path, image_size: int) -> tuple[int, tuple[int, int], list[float], list[float]]:
    """(resize shorter side, crop (h, w), mean, std) from a transformers ``preprocessor_config.json``, with
    the OpenAI CLIP defaults at ``image_size`` when the file is missing."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return image_size, (image_size, image_size), list(OPENAI_MEAN), list(OPENAI_STD)
    cfg = json.loads(path.read_text(encoding="utf-8"))
    size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
    short = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
    crop_hw = (crop.get("height", short), crop.get("width", short)) if isinstance(crop, dict) else (int(crop),) * 2
    return int(short), (int(crop_hw[0]), int(crop_hw[1])), list(cfg.get("image_mean", OPENAI_MEAN)), \
        list(cfg.get("image_std", OPENAI_STD))


def _features(out: Any) -> Tensor:
    """transformers ``get_*_features`` output as a tensor (v5 returns a model output with ``pooler_output``)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class PickScoreReward(_Frozen):
    """PickScore v1 (Kirstain et al. 2023): ``logit_scale.exp() * cos`` of a transformers ``CLIPModel``.

    ``model_dir``: local copy of yuvalkirstain/PickScore_v1; ``processor_dir``: local copy of the processor
    (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default ``model_dir``), from which the tokenizer and the
    resize / crop / mean / std of ``preprocessor_config.json`` are read. Images are preprocessed on tensors.
    """

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        model_dir: str | Path | None,
        processor_dir: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        mdir = _require_path(model_dir, "PickScore model", PICKSCORE_MODEL_URL, "folder")
        pdir = _require_path(processor_dir if processor_dir is not None else mdir, "PickScore processor",
                             PICKSCORE_PROCESSOR_URL, "folder")
        _require_path(mdir / "config.json", "PickScore model config.json", PICKSCORE_MODEL_URL)
        try:
            self.model = CLIPModel.from_pretrained(str(mdir), local_files_only=True).to(device=device, dtype=dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(str(pdir), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise FewstepError(f"cannot load PickScore from {mdir} / {pdir}: {first}; download "
                               f"{PICKSCORE_MODEL_URL} and {PICKSCORE_PROCESSOR_URL}") from exc
        vision = self.model.config.vision_config
        self.resize_to, self.crop, mean, std = _image_processor_cfg(pdir, int(vision.image_size))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        text = self.model.config.text_config
        self.max_length = min(int(self.tokenizer.model_max_length), int(text.max_position_embeddings))
        self.model_dir, self.processor_dir = str(mdir), str(pdir)
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """PickScore (N,): exp(logit_scale) * cos(image, prompt)."""
        x = check_images(images, len(prompts)).to(device=self.mean.device, dtype=torch.float32)
        x = (resize_center_crop(x, self.resize_to, self.crop) - self.mean) / self.std
        dtype = self.model.logit_scale.dtype
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x.to(dtype))).float(), dim=-1)
        with torch.no_grad():
            tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.mean.device)
            txt = F.normalize(_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                     attention_mask=tok["attention_mask"])).float(),
                              dim=-1)
        return self.model.logit_scale.exp().float() * (img * txt).sum(dim=-1)

    def describe(self) -> dict[str, Any]:
        """Name, model / processor folders, SHA-256 of the weights file, formula."""
        weights = next((self.model_dir + "/" + f for f in ("model.safetensors", "pytorch_model.bin")
                        if os.path.isfile(os.path.join(self.model_dir, f))), None)
        return {"name": self.name, "differentiable": self.differentiable, "model_dir": self.model_dir,
                "processor_dir": self.processor_dir, "weights_sha256": sha256_file(weights) if weights else None,
                "formula": "exp(logit_scale) * cos(image, text)"}


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: Linear 768-1024-128-64-16-1 with no activations.

    Positions 1, 3 and 5 held Dropout in the published training code; they are identities here (inference),
    kept so the state-dict keys (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) match
    the released ``sac+logos+ava1-l14-linearMSE.pth``.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                                    nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores (N, 1) of L2-normalised image embeddings (N, input_size)."""
        return self.layers(embeddings)


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """Load the aesthetic MLP (strict, ``torch.load(weights_only=True)`` or safetensors); input size from the file."""
    path = _require_path(path, "LAION aesthetic MLP sac+logos+ava1-l14-linearMSE.pth", AESTHETIC_URL)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, AttributeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FewstepError(f"{path} is not a LAION aesthetic MLP state dict ({first}); get it from "
                           f"{AESTHETIC_URL}") from exc
    return mlp


class AestheticReward(_Frozen):
    """LAION aesthetic predictor v2 on open_clip ViT-L-14 (OpenAI weights, QuickGELU); prompts are ignored.

    ``mlp_path``: local ``sac+logos+ava1-l14-linearMSE.pth``; ``clip_checkpoint``: local OpenAI ViT-L/14 file
    (or an open_clip tag such as "openai", resolved offline-safely as in ``ClipScorer``).
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        mlp_path: str | Path | None,
        clip_checkpoint: str | Path | None,
        *,
        clip_model: str | Path = "ViT-L-14-quickgelu",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        import open_clip

        self.mlp = load_aesthetic_mlp(mlp_path).to(device)
        is_tag = (clip_checkpoint is not None and not str(clip_model).endswith(".json")
                  and bool(open_clip.get_pretrained_cfg(str(clip_model), str(clip_checkpoint))))
        if not is_tag:
            _require_path(clip_checkpoint, "CLIP ViT-L/14 (OpenAI) checkpoint", CLIP_L14_URL)
        self.clip = ClipScorer.from_pretrained(clip_model, str(clip_checkpoint), scale="cos", device=device,
                                               precision=precision)
        embed = getattr(self.clip.model.visual, "output_dim", None)
        if embed is not None and int(embed) != self.mlp.layers[0].in_features:
            raise FewstepError(f"aesthetic MLP expects {self.mlp.layers[0].in_features}-d embeddings but "
                               f"{clip_model} gives {embed}-d; use CLIP ViT-L/14 (OpenAI)")
        self.mlp_path = str(mlp_path)
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """Aesthetic score (N,) (roughly 1-10 with the real weights)."""
        if prompts is not None:
            check_images(images, len(prompts))
        emb = self.clip.encode_images(images)
        return self.mlp(emb.to(self.mlp.layers[0].weight.dtype)).squeeze(-1).float()

    def describe(self) -> dict[str, Any]:
        """Name, CLIP model / checkpoint / hash, MLP path / hash, formula."""
        clip = self.clip.describe()
        return {"name": self.name, "differentiable": self.differentiable, "clip_model": clip["model"],
                "clip_checkpoint": clip["pretrained"], "clip_sha256": clip["weights_sha256"],
                "mlp": self.mlp_path, "mlp_sha256": sha256_file(self.mlp_path),
                "formula": "MLP(normalize(CLIP image embedding))"}


class DigitsClassReward(_Frozen):
    """Offline toy reward: the shipped digits classifier's log-probability (or probability) of the prompted digit.

    Images are reduced to 8x8 grey on tensors (channel mean, area pooling, as ``to_digits_input`` does) so the
    reward is differentiable; prompts must read "a handwritten digit {d}".
    """

    name = "digits-class"
    differentiable = True

    def __init__(self, weights: str | Path | None = None, kind: str = "logprob") -> None:
        super().__init__()
        from fewstep.metrics.digits import DEFAULT_WEIGHTS, load_digits_classifier

        if kind not in ("logprob", "prob"):
            raise FewstepError(f"unknown digits reward kind {kind!r}; use logprob or prob")
        path = _require_path(weights if weights is not None else DEFAULT_WEIGHTS, "digits classifier weights",
                             "scripts/train_digits_classifier.py (run it to create the file)")
        self.net, self.kind, self.weights = load_digits_classifier(path), kind, str(path)
        self.freeze()

    @property
    def upper_bound(self) -> float:
        """The reward's maximum, which bounds rejection sampling from a tilt: log p <= 0, p <= 1."""
        return 0.0 if self.kind == "logprob" else 1.0

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """log p(prompted digit | image) (or p) under the classifier, (N,)."""
        from fewstep.data.digits import parse_digit

        x = check_images(images, len(prompts)).float().clamp(0.0, 1.0)
        labels = []
        for p in prompts:
            d = parse_digit(p)
            if d is None:
                raise ValueError(f"digits reward needs prompts 'a handwritten digit N', got {p!r}")
            labels.append(d)
        grey = F.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), (8, 8))
        logp = F.log_softmax(self.net(grey.to(next(self.net.parameters()).device)), dim=-1)
        chosen = logp.gather(1, torch.tensor(labels, device=logp.device)[:, None]).squeeze(1)
        return chosen if self.kind == "logprob" else chosen.exp()

    def describe(self) -> dict[str, Any]:
        """Name, kind, weights path and SHA-256."""
        return {"name": self.name, "differentiable": self.differentiable, "kind": self.kind,
                "weights": self.weights, "weights_sha256": sha256_file(self.weights)}


class MicroClipReward(_Frozen):
    """Offline toy reward: CLIP score of the shipped micro-CLIP (``scale`` as in ``ClipScorer``)."""

    name = "micro-clip"
    differentiable = True

    def __init__(self, scale: str = "100cos", weights: str | Path | None = None,
                 config: str | Path | None = None) -> None:
        super().__init__()
        from fewstep.metrics.micro_clip import load_micro_clip

        self.clip = load_micro_clip(weights, config, scale=scale)
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """micro-CLIP score (N,)."""
        return self.clip.score(images, prompts)

    def describe(self) -> dict[str, Any]:
        """Name plus the ``ClipScorer`` description."""
        return {"name": self.name, "differentiable": self.differentiable, **self.clip.describe()}


class ClipScoreReward(_Frozen):
    """CLIP score (Hessel et al. 2021) of an open_clip model from a local checkpoint, as a reward: ``ClipScorer``
    with its differentiable resize / crop / normalise (``scale``: "100cos", "cos" or "2.5cos")."""

    name = "clip-score"
    differentiable = True

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | Path | None = None, scale: str = "100cos",
                 prompt_prefix: str = "") -> None:
        super().__init__()
        path = _require_path(pretrained, f"open_clip {model_name} checkpoint", "the open_clip model card of "
                             f"{model_name} (pass options: {{pretrained: /path/to/open_clip_model.safetensors}})")
        self.clip = ClipScorer.from_pretrained(model_name, path, scale=scale, prompt_prefix=prompt_prefix)
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """CLIP score (N,)."""
        return self.clip.score(images, prompts)

    def describe(self) -> dict[str, Any]:
        """Name plus the ``ClipScorer`` description."""
        return {"name": self.name, "differentiable": self.differentiable, **self.clip.describe()}


REWARDS: dict[str, Callable[..., nn.Module]] = {
    "hpsv2.1": HPSv21Reward,
    "pickscore": PickScoreReward,
    "aesthetic": AestheticReward,
    "digits-class": DigitsClassReward,
    "micro-clip": MicroClipReward,
    "clip-score": ClipScoreReward,
}


def list_rewards() -> list[str]:
    """Names accepted by ``build_reward``."""
    return list(REWARDS)


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build a reward by name (``list_rewards()``); ``kwargs`` go to its constructor (file paths, device, ...)."""
    key = name.strip().lower()
    if key not in REWARDS:
        raise FewstepError(f"unknown reward {name!r}; valid names: {', '.join(REWARDS)}")
    return REWARDS[key](**kwargs)  # type: ignore[return-value]
