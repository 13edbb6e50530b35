"""Metric accumulators of `fewstep eval` and the builders of the models they use (extractor, CLIP, rewards).

Every accumulator takes one generated batch at a time (`update(images, prompts, indices)`, float images
[B, 3, H, W] in [0, 1]) and keeps only what its metric needs: FID sums (`FeatureStats`, plus at most `kid_keep`
raw features), per-sample scores, 8x8 digit thumbnails, or the first few images of a grid. `finalize(accelerator)`
combines the shards of all processes (sums all-reduced, per-sample values gathered) and returns the metrics.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.metrics.features import FeatureExtractor, build_extractor, to_uint8_nchw
from fewstep.metrics.fid import FeatureStats, Reference, fid, gather_stats, kid
CROP_POLICY = {"crop": "center square on the long edge", "resize": "PIL LANCZOS"}


def slug(text: str) -> str:
    """Lower-case file-name-safe form of a label."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# --- images ---------------------------------------------------------------------------------------------------

def crop_resize(images: Tensor, res: int) -> Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, res, res]: centre square crop on the long edge, PIL LANCZOS resize."""
    from PIL import Image

    out = []
    for im in images.permute(0, 2, 3, 1).numpy():
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        pil = Image.fromarray(np.ascontiguousarray(im[top:top + s, left:left + s]))
        out.append(np.asarray(pil.resize((res, res), Image.LANCZOS) if s != res else pil))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def prepare(images: Tensor, eval_res: int | None) -> Tensor:
    """uint8 CPU images [B, 3, h, w] as saved to PNG, cropped/resized to `eval_res` when given."""
    x = to_uint8_nchw(images)
    return crop_resize(x, eval_res) if eval_res else x


def gather_list(values: Sequence[Any], accelerator: Any) -> list[Any]:
    """The concatenated lists of all processes (rank order); one process: its own list, no collective."""
    if accelerator.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return list(gather_object(list(values)))


# --- accumulators ---------------------------------------------------------------------------------------------

@dataclass
class FidMetric:
    """FID (and optionally KID) of the generated images against `reference`, from streamed features
    (`reference=None`: only accumulate, e.g. to build a reference)."""

    name: str
    extractor: FeatureExtractor
    reference: Reference | None = None
    eval_res: int | None = None
    kid_subset: int | None = None   # KID subset size (capped at the kept features); None = no KID
    kid_keep: int = 0
    stats: FeatureStats | None = None

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = FeatureStats(self.extractor.dim, self.kid_keep if self.kid_subset else 0)

    def update(self, images: Tensor, prompts: Sequence[str], indices: Sequence[int]) -> None:
        self.stats.update(self.extractor(prepare(images, self.eval_res)))

    def gathered(self, accelerator: Any) -> FeatureStats:
        """The statistics of all processes together (`gather_stats`; one process: its own)."""
        return self.stats if accelerator.num_processes == 1 else gather_stats(self.stats, accelerator)

    def finalize(self, accelerator: Any) -> dict[str, float]:
        stats = self.gathered(accelerator)
        out = {self.name: fid(stats, self.reference)}
        if self.kid_subset:
            ref = self.reference.features
            size = min(self.kid_subset, len(stats.features), 0 if ref is None else len(ref))
            if size >= 2:
                mean, std = kid(stats, self.reference, subsets=100, subset_size=size, seed=0)
                kname = self.name.replace("fid", "kid", 1)
                out.update({kname: mean, f"{kname}_std": std, f"{kname}_subset": float(size)})
        return out


@dataclass
class SampleMetric:
    """Mean of a per-sample score (CLIP score, reward) over all images; values are gathered by index."""

    name: str
    score: Callable[[Tensor, list[str]], Tensor]
    eval_res: int | None = None
    values: list[tuple[int, float]] = field(default_factory=list)

    def update(self, images: Tensor, prompts: Sequence[str], indices: Sequence[int]) -> None:
        x = prepare(images, self.eval_res).float() / 255.0 if self.eval_res else images.float()
        with torch.no_grad():
            v = self.score(x, list(prompts)).detach().float().cpu()
        self.values.extend(zip(indices, v.tolist()))

    def finalize(self, accelerator: Any) -> dict[str, float]:
        values = sorted(gather_list(self.values, accelerator))
        return {self.name: float(np.mean([v for _, v in values])) if values else math.nan}


@dataclass
class DigitsMetric:
    """Class accuracy and per-class diversity of the toy teacher (`score_digits`) from 8x8 thumbnails."""

    thumbs: list[tuple[int, np.ndarray, int]] = field(default_factory=list)

    def update(self, images: Tensor, prompts: Sequence[str], indices: Sequence[int]) -> None:
        from fewstep.data.digits import parse_digit
        from fewstep.metrics.digits import to_digits_input

        labels = [parse_digit(p) for p in prompts]
        if any(lab is None for lab in labels):
            raise FewstepError("digits metrics need prompts 'a handwritten digit N': use the toy-digits teacher")
        x = to_digits_input(to_uint8_nchw(images)).numpy()
        self.thumbs.extend(zip(indices, x, labels))

    def finalize(self, accelerator: Any) -> dict[str, float]:
        from fewstep.metrics.digits import score_digits

        rows = sorted(gather_list(self.thumbs, accelerator), key=lambda r: r[0])
        s = score_digits(np.stack([r[1] for r in rows]), [r[2] for r in rows])
        return {"class_accuracy": s.class_accuracy, "diversity": s.diversity}


@dataclass
class GridKeeper:
    """The first `size` images of the run (by index) as uint8, gathered from every process."""

    size: int
    per_process: int
    kept: list[tuple[int, Tensor]] = field(default_factory=list)

    def update(self, images: Tensor, prompts: Sequence[str], indices: Sequence[int]) -> None:
        room = self.per_process - len(self.kept)
        if room > 0:
            self.kept.extend(zip(indices[:room], to_uint8_nchw(images[:room]).unbind(0)))

    def finalize(self, accelerator: Any) -> Tensor | None:
        rows = sorted(gather_list([(i, t.numpy()) for i, t in self.kept], accelerator), key=lambda r: r[0])
        rows = rows[: self.size]
        return torch.from_numpy(np.stack([r[1] for r in rows])) if rows else None


@dataclass
class GenEvalWriter:
    """Writes image i as `<folder>/<i // k:05d>/samples/<i % k:04d>.png` (GenEval layout, k images per prompt);
    `finalize` scores the folder on the main process with `fewstep.eval.geneval.score_run`."""

    folder: Path
    per_prompt: int
    detector: Any
    config: Any

    def update(self, images: Tensor, prompts: Sequence[str], indices: Sequence[int]) -> None:
        from fewstep.sample import to_pil

        for i, img in zip(indices, images.float().cpu()):
            to_pil(img, gray=False).save(self.folder / f"{i // self.per_prompt:05d}" / "samples"
                                         / f"{i % self.per_prompt:04d}.png")

    def finalize(self, accelerator: Any) -> tuple[dict[str, float], str | None]:
        from fewstep.eval.geneval import HueColorClassifier, score_run

        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return {}, None
        rep = score_run(self.folder, self.detector, HueColorClassifier(), config=self.config)
        metrics = {"geneval_overall": rep.overall, "geneval_image_accuracy": rep.image_accuracy,
                   "geneval_prompt_accuracy": rep.prompt_accuracy,
                   **{f"geneval[{t}]": v for t, v in rep.per_task.items()}}
        return metrics, rep.label

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"detector": getattr(self.detector, "name", None), "color_classifier": "hue (HueColorClassifier)",
                "folder": str(self.folder), "config": asdict(self.config)}


# --- builders ---------------------------------------------------------------------------------------------------

def extractor_name(spec_extractor: str, teacher_name: str) -> str:
    """`auto` -> digits for the toy-digits teacher, inception otherwise."""
    from fewstep.sample import GRAYSCALE_TEACHERS

    if spec_extractor == "auto":
        return "digits" if teacher_name in GRAYSCALE_TEACHERS else "inception"
    return spec_extractor


def make_extractor(name: str, weights: str | None, clip_model: str, device: str) -> FeatureExtractor:
    """A feature extractor for FID from local weights (`build_extractor`)."""
    if name in ("digits", "digits-mlp"):
        return build_extractor(name)
    if name == "inception":
        return build_extractor("inception", weights=weights, device=device)
    return build_extractor("clip", model_name=clip_model, pretrained=weights, device=device)


def make_clip(model: str, pretrained: str | None, scale: str, prefix: str, device: str) -> Any:
    """A `ClipScorer` (micro-CLIP or an open_clip model from a local checkpoint)."""
    if model == "micro-clip":
        from fewstep.metrics.micro_clip import load_micro_clip

        return load_micro_clip(scale=scale, prompt_prefix=prefix)
    from fewstep.metrics.clip_score import ClipScorer

    if pretrained is None:
        raise FewstepError(f"CLIP score with {model} needs local weights: pass --set clip.pretrained=PATH")
    return ClipScorer.from_pretrained(model, pretrained, scale=scale, prompt_prefix=prefix, device=device)


def make_reward(name: str, options: dict[str, Any], device: str) -> Any:
    """`build_reward(name, **options)`, with `device` when the reward takes one."""
    import inspect

    from fewstep.metrics.rewards import REWARDS, build_reward

    cls = REWARDS.get(name.strip().lower())
    kwargs = dict(options)
    if cls is not None and "device" in inspect.signature(cls).parameters:
        kwargs.setdefault("device", device)
    return build_reward(name, **kwargs)


def shared_scorers(proto: Any, device: str, out: Path | None, acc: Any) -> dict[str, Any]:
    """CLIP scorer, rewards and GenEval detector of a protocol, built once before any generation."""
    built: dict[str, Any] = {"rewards": [make_reward(r.name, r.options, device) for r in proto.rewards]}
    if proto.clip.model != "none":
        c = proto.clip
        built["clip"] = make_clip(c.model, c.pretrained, c.scale, c.prompt_prefix, device)
    if proto.prompts.source == "geneval":
        from fewstep.eval.geneval import TransformersDetector, load_geneval_config
        from fewstep.eval.protocols import repo_path

        if out is None:
            raise FewstepError("the geneval protocol writes image folders: run it with `fewstep eval --out DIR`")
        built["geneval_config"] = load_geneval_config(repo_path(proto.geneval.config))
        built["detector"] = TransformersDetector(proto.geneval.detector_weights, device) \
            if acc.is_main_process else None
    return built


def geneval_writer(folder: Path, n: int, seed: int, shared: dict[str, Any], acc: Any) -> GenEvalWriter:
    """Lay out `folder` for the first `n` GenEval images (main process) and return the sink that fills it."""
    from fewstep.eval.geneval import geneval_layout, load_geneval_prompts

    cfg = shared["geneval_config"]
    k = cfg.images_per_prompt
    if acc.is_main_process:
        geneval_layout(folder, load_geneval_prompts()[: -(-n // k)], k, seed)
    acc.wait_for_everyone()
    return GenEvalWriter(folder, k, shared["detector"], cfg)
