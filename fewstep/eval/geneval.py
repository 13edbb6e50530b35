"""GenEval-style compositional scoring (Ghosh et al. 2023): fewstep's own implementation of the published rules
(evaluation notes §4.3) behind a pluggable :class:`Detector` and :class:`ColorClassifier`; prompt data from
``eval/geneval/`` (MIT). Only the official mmdet Mask2Former + CLIP stack may be reported as "GenEval"; any other
run is labelled ``"GenEval-style (detector=...)"``."""
from __future__ import annotations

import colorsys
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from fewstep.errors import FewstepError

GENEVAL_DIR = Path(__file__).resolve().parents[2] / "eval" / "geneval"
PRESET_PATH = GENEVAL_DIR / "scoring.yaml"
METADATA_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
_HUE_BANDS = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"),
              (330, "magenta"), (360, "red"))
SCENE_KEY = "fewstep_scene"  # image.info key of draw_scene's description
CANONICAL_RGB = {"red": (220, 20, 30), "orange": (255, 140, 0), "yellow": (250, 220, 20), "green": (30, 160, 40),
                 "blue": (30, 60, 220), "purple": (120, 40, 170), "pink": (255, 150, 190),
                 "brown": (120, 70, 30), "black": (15, 15, 15), "white": (245, 245, 245)}
_COCO_ALIASES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
                 "monitor": "tv", "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "hairdryer": "hair drier", "doughnut": "donut"}  # other labels match after dropping spaces


@dataclass(frozen=True)
class GenEvalConfig:
    """Scoring options. Defaults are the official script's defaults (evaluation notes §4.3)."""
    threshold: float = 0.3  # keep detections with score > threshold
    counting_threshold: float = 0.9  # ... or > counting_threshold for tag "counting"
    max_objects: int = 16  # per class, highest scores first
    max_overlap: float = 1.0  # greedy per-class NMS IoU limit; 1.0 disables NMS
    position_threshold: float = 0.1  # per-axis margin, as a fraction of the summed box sizes
    images_per_prompt: int = 4
    seed_base: int = 42


def load_geneval_config(path: str | Path | None = None) -> GenEvalConfig:
    """Read the protocol preset (default ``eval/geneval/scoring.yaml``) into a :class:`GenEvalConfig`."""
    import yaml
    data = yaml.safe_load(Path(path or PRESET_PATH).read_text())
    values = {**data.get("scoring", {}), "images_per_prompt": data.get("images_per_prompt", 4),
              "seed_base": data.get("seeds", {}).get("base", 42)}
    return GenEvalConfig(**{k: v for k, v in values.items() if k in GenEvalConfig.__dataclass_fields__})


@dataclass
class GenEvalPrompt:
    """One metadata line: ``include``/``exclude`` items are ``{class, count, color?, position?: [relation, group]}``."""
    tag: str
    include: list[dict[str, Any]]
    prompt: str
    exclude: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenEvalPrompt":
        """Validate and build a prompt from one parsed metadata line."""
        items = [*data.get("include", []), *data.get("exclude", [])]
        if data.get("tag") not in TASKS or any("class" not in i or int(i.get("count", 0)) < 1 for i in items):
            raise ValueError(f"not a GenEval metadata line (tags: {TASKS}): {data!r}")
        return cls(data["tag"], list(data["include"]), data["prompt"], list(data.get("exclude") or []))

    def to_dict(self) -> dict[str, Any]:
        """The metadata object, with the official key order (so ``json.dumps`` reproduces the line)."""
        exclude = {"exclude": self.exclude} if self.exclude else {}
        return {"tag": self.tag, "include": self.include, **exclude, "prompt": self.prompt}


def load_geneval_prompts(path: str | Path | None = None) -> list[GenEvalPrompt]:
    """Load GenEval metadata lines (default: the shipped 553-prompt ``evaluation_metadata.jsonl``)."""
    path = Path(path) if path else GENEVAL_DIR / "evaluation_metadata.jsonl"
    if not path.is_file():
        raise FewstepError(f"GenEval prompt file not found: {path} (it ships in the repository under eval/geneval/)")
    return [GenEvalPrompt.from_dict(json.loads(x)) for x in path.read_text("utf-8").splitlines() if x.strip()]


def load_object_names(path: str | Path | None = None) -> list[str]:
    """The 80 COCO class names GenEval uses, in mmdet order."""
    lines = Path(path or GENEVAL_DIR / "object_names.txt").read_text("utf-8").splitlines()
    return [x.strip() for x in lines if x.strip()]


def geneval_seed(prompt_index: int, k: int, n_per_prompt: int, base: int = 42) -> int:
    """Seed of image ``k`` of prompt ``prompt_index``: ``base + prompt_index * n_per_prompt + k``."""
    return base + prompt_index * n_per_prompt + k


class GenEvalSlot(NamedTuple):
    """Where the images of one prompt go, and the seed of each."""
    index: int
    prompt: GenEvalPrompt
    folder: Path
    image_paths: list[Path]
    seeds: list[int]


def _write_metadata(out_dir: str | Path, index: int, prompt: GenEvalPrompt) -> Path:
    """Create ``<out>/<index:05d>/samples`` and write the prompt's metadata line; return the prompt folder."""
    folder = Path(out_dir) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(prompt.to_dict()) + "\n", encoding="utf-8")
    return folder


def geneval_layout(out_dir: str | Path, prompts: Sequence[GenEvalPrompt], n_per_prompt: int = 4,
                   base_seed: int = 42) -> list[GenEvalSlot]:
    """Create ``<out>/<index:05d>/{metadata.jsonl,samples/}`` for every prompt and return the slots to fill."""
    folders = [_write_metadata(out_dir, i, prompt) for i, prompt in enumerate(prompts)]
    return [GenEvalSlot(i, prompt, folder, [folder / "samples" / f"{k:04d}.png" for k in range(n_per_prompt)],
                        [geneval_seed(i, k, n_per_prompt, base_seed) for k in range(n_per_prompt)])
            for i, (prompt, folder) in enumerate(zip(prompts, folders))]


def write_geneval_images(out_dir: str | Path, index: int, prompt: GenEvalPrompt,
                         images: Sequence[Image.Image]) -> list[Path]:
    """Write ``metadata.jsonl`` and ``samples/0000.png...`` for prompt ``index`` (PNG text chunks are kept)."""
    folder = _write_metadata(out_dir, index, prompt)
    paths = [folder / "samples" / f"{k:04d}.png" for k in range(len(images))]
    for path, image in zip(paths, images):
        info = PngInfo()
        for key, value in image.info.items():
            if isinstance(key, str) and isinstance(value, str):
                info.add_text(key, value)
        image.save(path, pnginfo=info)
    return paths


@dataclass
class Detection:
    """One detected object: GenEval class name, score, pixel box ``(x0, y0, x1, y1)``, optional HxW bool mask."""
    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


@runtime_checkable
class Detector(Protocol):
    """Anything that turns an image into detections labelled with GenEval's 80 class names."""
    def detect(self, image: Image.Image) -> list[Detection]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names the colour (one of :data:`COLORS`) of one detected object."""
    def color(self, image: Image.Image, detection: Detection) -> str: ...


def _region_pixels(image: Image.Image, det: Detection) -> np.ndarray:
    """RGB pixels (N, 3) inside the detection's mask, or inside its box when there is no mask."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    x0, y0 = max(int(np.floor(det.box[0])), 0), max(int(np.floor(det.box[1])), 0)
    x1, y1 = min(int(np.ceil(det.box[2])), w), min(int(np.ceil(det.box[3])), h)
    crop = rgb[y0:y1, x0:x1].reshape(-1, 3)
    if det.mask is not None:
        inside = np.asarray(det.mask, dtype=bool)[y0:y1, x0:x1].reshape(-1)
        crop = crop[inside] if inside.any() else crop
    return crop if len(crop) else rgb.reshape(-1, 3)


def hsv_color_name(h: float, s: float, v: float) -> str:
    """Map an HSV colour (all in [0, 1]) to one of GenEval's 10 colour names with fixed hue/brightness rules:
    dark -> black, unsaturated -> white/black, then hue bands; light red -> pink, dark red/orange -> brown."""
    if v < 0.2 or s < 0.2:
        return "black" if v < 0.6 else "white"
    band = next(name for edge, name in _HUE_BANDS if h * 360.0 < edge)
    if band == "red":
        return "pink" if (s < 0.65 and v > 0.7) else ("brown" if v < 0.45 else "red")
    if band == "orange":
        return "brown" if (v < 0.65 or (s < 0.5 and v < 0.85)) else "orange"
    if band == "magenta":
        return "purple" if v < 0.6 else "pink"
    return band


class HueColorClassifier:
    """Deterministic colour classifier: mean RGB of the mask (or box) pixels -> HSV -> :func:`hsv_color_name`.
    An offline stand-in for logic tests. Official GenEval uses CLIP zero-shot colours (open_clip ViT-L-14 openai,
    mask over #999 grey, cropped to the box); scores with this classifier are not comparable with GenEval's."""
    def color(self, image: Image.Image, detection: Detection) -> str:
        """Colour name of the detection's mask (or box) pixels."""
        r, g, b = _region_pixels(image, detection).astype(np.float64).mean(axis=0) / 255.0
        return hsv_color_name(*colorsys.rgb_to_hsv(r, g, b))


def draw_scene(objects: Sequence[dict[str, Any]], size: tuple[int, int] = (128, 128),
               background: tuple[int, int, int] = (153, 153, 153)) -> Image.Image:
    """Draw flat shapes, each ``{class, box: [x0,y0,x1,y1], color: name|rgb, shape?: rect|ellipse, score?}``; the
    scene is kept as JSON in ``image.info["fewstep_scene"]`` (a PNG text chunk once written) for the oracle."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    spec = []
    for obj in objects:
        fill = CANONICAL_RGB[obj["color"]] if isinstance(obj["color"], str) else tuple(obj["color"])
        shape = obj.get("shape", "rect")
        (draw.ellipse if shape == "ellipse" else draw.rectangle)(list(obj["box"]), fill=fill)
        spec.append({"class": obj["class"], "box": list(obj["box"]), "shape": shape, "score": obj.get("score", 0.99)})
    image.info[SCENE_KEY] = json.dumps(spec)
    return image


class SyntheticSceneDetector:
    """Oracle detector for :func:`draw_scene` images: labels, boxes and scores from the stored scene description,
    masks re-rasterised from the shapes. It reports no colours: those come from the pixels via a ColorClassifier."""
    name = "synthetic-oracle"

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections of the scene stored in the image's ``fewstep_scene`` text chunk."""
        if SCENE_KEY not in image.info:
            raise ValueError("SyntheticSceneDetector needs an image made by draw_scene (no scene description found)")
        out = []
        for obj in json.loads(image.info[SCENE_KEY]):
            draw = ImageDraw.Draw(canvas := Image.new("L", image.size, 0))
            (draw.ellipse if obj["shape"] == "ellipse" else draw.rectangle)(obj["box"], fill=255)
            out.append(Detection(obj["class"], float(obj["score"]), tuple(obj["box"]), np.asarray(canvas) > 0))
        return out


def to_geneval_name(label: str, names: Sequence[str] | None = None) -> str | None:
    """Map a detector's label (COCO/VOC spelling variants) to a GenEval class name, or None if it has none."""
    valid = set(names or load_object_names())
    key = re.sub(r"[\s_\-]+", " ", label.strip().lower())
    key = key if key in valid else _COCO_ALIASES.get(key.replace(" ", ""), key)
    return key if key in valid else next((n for n in valid if n.replace(" ", "") == key.replace(" ", "")), None)


class GenEvalWeightsMissing(FewstepError, FileNotFoundError):
    """The local detector checkpoint folder is missing or incomplete."""


class TransformersDetector:
    """Adapter for a local transformers object-detection checkpoint (e.g. DETR), loaded with ``local_files_only``.
    Labels map to GenEval's 80 names (others dropped); the GenEval thresholds are applied later by the rules."""
    def __init__(self, model_dir: str | Path, device: str = "cpu", min_score: float = 0.05) -> None:
        self.model_dir, self.device, self.min_score = Path(model_dir), device, min_score
        if not (self.model_dir / "config.json").is_file():
            raise GenEvalWeightsMissing(
                f"GenEval detector weights not found: {self.model_dir} has no config.json. Download a transformers "
                f"object-detection checkpoint (e.g. facebook/detr-resnet-50: config.json, preprocessor_config.json, "
                f"weights) on a machine with internet access and put the files in {self.model_dir}.")
        from transformers import AutoImageProcessor, AutoModelForObjectDetection
        self.processor = AutoImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModelForObjectDetection.from_pretrained(self.model_dir, local_files_only=True).eval()
        self.model.to(device)
        names = load_object_names()
        self.label_map = {int(i): to_geneval_name(n, names) for i, n in self.model.config.id2label.items()}
        self.name = f"transformers:{self.model_dir.name}"

    def detect(self, image: Image.Image) -> list[Detection]:
        """Run the model on one image and return detections with GenEval names and pixel boxes."""
        import torch
        rgb = image.convert("RGB")
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=[(rgb.height, rgb.width)])[0]
        rows = zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist())
        return [Detection(self.label_map[int(lab)], float(sc), tuple(map(float, box)))
                for sc, lab, box in rows if self.label_map.get(int(lab))]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (continuous pixel coordinates)."""
    iw, ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0), max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def filter_detections(detections: Sequence[Detection], tag: str,
                      config: GenEvalConfig = GenEvalConfig()) -> dict[str, list[Detection]]:
    """Per class: score > threshold (counting_threshold for "counting"), best first, at most max_objects, then
    greedy NMS that drops a box whose IoU with a kept one reaches max_overlap (disabled at 1.0)."""
    limit = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in sorted((d for d in detections if d.score > limit), key=lambda d: -d.score):
        by_class.setdefault(det.label, []).append(det)
    for label, dets in by_class.items():
        kept: list[Detection] = []
        for det in dets[: config.max_objects]:
            if config.max_overlap >= 1.0 or all(box_iou(det.box, k.box) < config.max_overlap for k in kept):
                kept.append(det)
        by_class[label] = kept
    return by_class


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of A to B. Each axis of the centre offset is shrunk towards 0 by ``threshold * (size_a + size_b)``,
    then divided by the length of the unshrunk offset; a component beyond ±0.5 gives left/right/above/below."""
    a, b = np.asarray(box_a[:4], dtype=np.float64), np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    margin = threshold * ((a[2:] - a[:2]) + (b[2:] - b[:2]))
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin, 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {rel for rel, ok in found.items() if ok}


def score_prompt(prompt: GenEvalPrompt, detections: Sequence[Detection], image: Image.Image,
                 color_classifier: ColorClassifier, config: GenEvalConfig = GenEvalConfig()) -> tuple[bool, str]:
    """Score one image: ``(correct, reason)``, every failed clause in ``reason``. Each include needs ``count`` kept
    detections of its class; its top ``count`` must all have the colour and stand in the relation to every object
    of the (matched) target group. Each exclude needs fewer than ``count`` kept detections."""
    objects = filter_detections(detections, prompt.tag, config)
    problems: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in prompt.include:
        cls, n = req["class"], int(req["count"])
        found = objects.get(cls, [])[:n]
        ok = len(found) >= n
        if not ok:
            problems.append(f"expected {n} {cls}, found {len(found)}")
        names = [color_classifier.color(image, det) for det in found] if ok and req.get("color") else []
        if names and names.count(req["color"]) < n:
            ok = False
            problems.append(f"expected {n} {req['color']} {cls}, colours were {', '.join(names)}")
        if ok and req.get("position"):
            relation, target = req["position"][0], int(req["position"][1])
            targets, other = groups[target] if target < len(groups) else None, prompt.include[target]["class"]
            rels = [relative_position(d.box, t.box, config.position_threshold) for d in found for t in targets or []]
            bad = next((r for r in rels if relation not in r), None)
            if targets is None or bad is not None:
                ok = False
                problems.append(f"no matched {other} for {cls} to be {relation}" if targets is None else
                                f"expected {cls} {relation} {other}, found {' and '.join(sorted(bad)) or 'none'}")
        groups.append(found if ok else None)
    for req in prompt.exclude:
        k = len(objects.get(req["class"], []))
        if k >= int(req["count"]):
            problems.append(f"expected fewer than {req['count']} {req['class']}, found {k}")
    return not problems, "; ".join(problems)


@dataclass
class GenEvalReport:
    """Summary of a scored run; ``overall`` is the unweighted mean of the per-task image accuracies."""
    label: str
    detector: str
    n_images: int
    n_prompts: int
    per_task: dict[str, float]
    overall: float
    image_accuracy: float
    prompt_accuracy: float  # a prompt counts as correct when any of its images is
    results_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the report."""
        return asdict(self)


def score_run(out_dir: str | Path, detector: Detector, color_classifier: ColorClassifier, *,
              config: GenEvalConfig | None = None, official: bool = False,
              results_path: str | Path | None = None) -> GenEvalReport:
    """Score every ``<out>/<digits>/samples/<digits>.png``, write ``results.jsonl`` (official columns), summarise.
    ``official=True`` labels the report "GenEval": only for the official detector and colour classifier."""
    config, root, rows, by_prompt = config or GenEvalConfig(), Path(out_dir), [], {}
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for folder in folders:
        prompt = GenEvalPrompt.from_dict(json.loads((folder / "metadata.jsonl").read_text("utf-8").splitlines()[0]))
        samples = sorted(p for p in (folder / "samples").iterdir() if re.fullmatch(r"\d+\.png", p.name))
        for path in samples:
            with Image.open(path) as im:
                image = im.convert("RGB")
                image.info.update({k: v for k, v in im.info.items() if isinstance(v, str)})
            detections = detector.detect(image)
            correct, reason = score_prompt(prompt, detections, image, color_classifier, config)
            kept = filter_detections(detections, prompt.tag, config)
            rows.append({"filename": str(path), "tag": prompt.tag, "prompt": prompt.prompt, "correct": correct,
                         "reason": reason, "metadata": json.dumps(prompt.to_dict()),
                         "details": json.dumps({c: [[*d.box, d.score] for d in v] for c, v in kept.items()})})
            by_prompt[folder.name] = by_prompt.get(folder.name, False) or correct
    if not rows:
        raise FewstepError(f"no GenEval images found under {root} (expected <out>/00000/samples/0000.png ...)")
    per_task = {t: float(np.mean([r["correct"] for r in rows if r["tag"] == t]))
                for t in TASKS if any(r["tag"] == t for r in rows)}
    results = Path(results_path) if results_path else root / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    name = getattr(detector, "name", type(detector).__name__)
    return GenEvalReport(label="GenEval" if official else f"GenEval-style (detector={name})", detector=name,
                         n_images=len(rows), n_prompts=len(by_prompt), per_task=per_task,
                         overall=float(np.mean(list(per_task.values()))),
                         image_accuracy=float(np.mean([r["correct"] for r in rows])),
                         prompt_accuracy=float(np.mean(list(by_prompt.values()))), results_path=str(results))
