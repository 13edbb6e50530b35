"""Evaluation protocol presets: `eval/protocols/<name>.yaml` validated against a typed OmegaConf schema.

A protocol says which prompts to generate (and how many, with which seeds), which metrics to compute and
against which reference (evaluation.md sections 5 and 8). Every file a protocol needs from the user (COCO
captions and images, Inception / CLIP / reward / detector weights) is listed under `local_files`: a key left
null is read from the named environment variable, and a missing file stops the run before any work with one
line naming the file, the env var and the `--set` override.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fewstep.errors import FewstepError

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DIR = ROOT / "eval" / "protocols"
EXTRA_EXTRACTORS = ("digits", "digits-mlp")   # fid.extra_extractors: extractors that need no weights file
CHOICES: dict[str, tuple[str, ...]] = {
    "main_metric": ("fid", "clip_score", "reward", "geneval"),
    "prompts.source": ("digits", "file", "geneval"),
    "fid.extractor": ("none", "auto", "digits", "digits-mlp", "inception", "clip"),
    "fid.reference": ("none", "digits", "teacher", "folder"),
    "clip.scale": ("100cos", "cos", "hessel"),
    "geneval.detector": ("transformers",),
}


@dataclass
class PromptsSpec:
    source: str = "file"                 # digits | file | geneval
    file: Optional[str] = None           # source=file: text file (one prompt per line) or COCO captions JSON


@dataclass
class FidSpec:
    extractor: str = "none"              # none | auto (digits for toy-digits, else inception) | digits | digits-mlp
                                         # | inception | clip
    extra_extractors: List[str] = field(default_factory=list)  # more FIDs on the same images and reference, each
                                         # fid[<id>]: offline digits extractors only (digits, digits-mlp)
    weights: Optional[str] = None        # Inception file/folder, or CLIP checkpoint (file or open_clip tag)
    clip_model: str = "ViT-B-32"         # open_clip architecture for extractor=clip
    reference: str = "none"              # digits (1797 real digits) | teacher (teacher samples) | folder
    reference_folder: Optional[str] = None
    eval_res: Optional[int] = None       # centre crop on the long edge + LANCZOS resize (both sides); null = as is
    teacher_steps: int = 50              # reference=teacher: the teacher's sampling steps
    teacher_guidance: Optional[float] = None  # reference=teacher: its CFG scale (null = the evaluated row's)
    kid: bool = False                    # also KID (seeded subsets of kept features)
    kid_keep: int = 1000                 # raw features kept per side for KID
    kid_subset_size: int = 1000          # capped at the features available


@dataclass
class ClipSpec:
    model: str = "none"                  # none | micro-clip | open_clip architecture (ViT-g-14) | config JSON
    pretrained: Optional[str] = None     # local checkpoint file (or open_clip tag)
    scale: str = "100cos"                # 100cos | cos | hessel
    prompt_prefix: str = ""


@dataclass
class RewardSpec:
    name: str = MISSING                  # fewstep.metrics.rewards.build_reward name
    options: Dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments (file paths, ...)


@dataclass
class GenEvalSpec:
    config: str = "eval/geneval/scoring.yaml"    # scoring rules (thresholds, images per prompt, seed base)
    detector: str = "transformers"       # transformers (a local object-detection checkpoint folder)
    detector_weights: Optional[str] = None


@dataclass
class LocalFile:
    key: str = MISSING                   # dotted protocol key holding the path
    env: str = MISSING                   # environment variable read when the key is null
    kind: str = "file"                   # file | dir | path (file or folder)
    what: str = ""                       # what the file is and where it comes from


@dataclass
class Protocol:
    name: str = MISSING
    description: str = ""
    main_metric: str = "fid"             # fid | clip_score | reward | geneval: plotted against NFE
    num_images: Optional[int] = None     # null = one image per prompt
    seed: int = 0                        # image i uses seed + i
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    fid: FidSpec = field(default_factory=FidSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)
    rewards: List[RewardSpec] = field(default_factory=list)
    digits: bool = False                 # class accuracy + per-class diversity (toy-digits teacher)
    geneval: GenEvalSpec = field(default_factory=GenEvalSpec)
    local_files: List[LocalFile] = field(default_factory=list)
    stats_dir: Optional[str] = None      # reference-statistics store (null: $FEWSTEP_STATS_DIR or ~/.cache)
    grid: int = 100                      # images in each sample grid (at most 100)


def list_protocols() -> list[str]:
    """Names of the shipped presets (`eval/protocols/*.yaml`)."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_path(name: str) -> Path:
    """The preset file of `name` (or `name` itself when it is a YAML file); FewstepError listing valid names."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    path = PROTOCOL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FewstepError(f"unknown protocol {name!r}; valid protocols: {', '.join(list_protocols())} "
                           f"(or a YAML file)")
    return path


def _explain(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    if type(exc).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
        return f"unknown protocol key {key!r} in {source}; see the keys documented in eval/protocols/*.yaml"
    return f"bad value for protocol key {key!r} in {source}: {str(exc).splitlines()[0]}"


def load_protocol_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Preset + `key=value` overrides merged into the schema; unknown keys and bad values name the key."""
    path = protocol_path(name)
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors: one line
        raise FewstepError(f"malformed YAML in {path}: {str(exc).splitlines()[0]}; fix the file's syntax") from exc
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FewstepError(f"--set takes key=value (got {bad[0]!r}), e.g. --set fid.reference_folder=/data/val2014")
    schema = OmegaConf.structured(Protocol)
    cfg = schema
    for layer, source in ((raw, str(path)), (list(overrides), "--set")):
        try:
            layer_cfg = OmegaConf.from_dotlist(layer) if isinstance(layer, list) else layer
            cfg = OmegaConf.merge(cfg, layer_cfg)
        except OmegaConfBaseException as exc:
            raise FewstepError(_explain(exc, source)) from exc
    check_values(cfg)
    return cfg


def check_values(cfg: DictConfig) -> None:
    """Choices, ranges and required keys; FewstepError naming the key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FewstepError(f"protocol key {missing[0]} must be set")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise FewstepError(f"bad value {key}={value!r} in protocol {cfg.name}; choose one of {list(allowed)}")
    for key, low in (("num_images", 1), ("fid.teacher_steps", 1), ("fid.kid_keep", 2), ("fid.kid_subset_size", 2),
                     ("fid.eval_res", 8)):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise FewstepError(f"protocol key {key} must be >= {low} (got {value})")
    if not 0 <= cfg.grid <= 100:
        raise FewstepError(f"protocol key grid must be in 0..100 (got {cfg.grid})")
    for i, f in enumerate(cfg.local_files):
        if f.kind not in ("file", "dir", "path"):
            raise FewstepError(f"bad value local_files.{i}.kind={f.kind!r}; choose one of ['file', 'dir', 'path']")
    extras = list(cfg.fid.extra_extractors)
    for i, name in enumerate(extras):
        if name not in EXTRA_EXTRACTORS:
            raise FewstepError(f"bad value fid.extra_extractors.{i}={name!r} in protocol {cfg.name}; choose from "
                               f"{list(EXTRA_EXTRACTORS)}")
    if len(set(extras)) != len(extras) or cfg.fid.extractor in extras:
        raise FewstepError(f"protocol {cfg.name}: fid.extra_extractors must not repeat an extractor "
                           f"(fid.extractor={cfg.fid.extractor}, extra {extras})")
    if extras and cfg.fid.extractor == "none":
        raise FewstepError(f"protocol {cfg.name}: fid.extra_extractors needs fid.extractor")
    if cfg.fid.reference != "none" and cfg.fid.extractor == "none":
        raise FewstepError(f"protocol {cfg.name}: fid.reference={cfg.fid.reference} needs fid.extractor")
    if cfg.main_metric == "geneval" and cfg.prompts.source != "geneval":
        raise FewstepError(f"protocol {cfg.name}: main_metric=geneval needs prompts.source=geneval")


def _exists(path: Path, kind: str) -> bool:
    return path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists()


def resolve_local_files(cfg: DictConfig) -> None:
    """Fill null `local_files` keys from their env vars and check every path exists (FewstepError otherwise)."""
    for f in cfg.local_files:
        value = OmegaConf.select(cfg, f.key, default=MISSING)
        if value is MISSING:
            raise FewstepError(f"protocol {cfg.name}: local_files names unknown key {f.key!r}")
        how = f"set {f.env}=PATH or pass --set {f.key}=PATH"
        value = value if value is not None else os.environ.get(f.env) or None
        if value is None:
            raise FewstepError(f"protocol {cfg.name} needs the {f.what or f.key}, which is not set: {how}")
        if not _exists(Path(str(value)).expanduser(), f.kind):
            raise FewstepError(f"protocol {cfg.name}: {f.what or f.key} not found at {value}: {how}")
        OmegaConf.update(cfg, f.key, str(Path(str(value)).expanduser()), merge=False)


def load_protocol(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Protocol:
    """Load, validate and resolve a protocol: the typed `Protocol` the harness runs."""
    cfg = load_protocol_config(name, overrides)
    resolve_local_files(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def repo_path(path: str) -> Path:
    """A path as given when it exists, else relative to the repository root (for files shipped with fewstep)."""
    p = Path(path).expanduser()
    return p if p.exists() or p.is_absolute() else ROOT / p


def read_captions(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a COCO captions JSON (the first caption, by
    annotation id, of every image, in image-id order)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            anns = json.loads(p.read_text(encoding="utf-8"))["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FewstepError(f"{p} is not a COCO captions file (no 'annotations'): pass captions_*.json") from exc
        first: dict[int, tuple[int, str]] = {}
        for a in anns:
            key = (int(a["id"]), str(a["caption"]).strip())
            first[int(a["image_id"])] = min(first.get(int(a["image_id"]), key), key)
        return [first[k][1] for k in sorted(first)]
    from fewstep.data.datasets import read_prompts

    return read_prompts(str(p))


def build_prompts(proto: Protocol, num_images: int | None) -> list[str]:
    """The protocol's prompt list, one per image (image i gets prompt i); its length is the image count."""
    if proto.prompts.source == "digits":
        from fewstep.data.digits import class_balanced_prompts

        return class_balanced_prompts(num_images or proto.num_images or 1000)
    if proto.prompts.source == "geneval":
        from fewstep.eval.geneval import load_geneval_config, load_geneval_prompts

        k = load_geneval_config(repo_path(proto.geneval.config)).images_per_prompt
        prompts = [p.prompt for p in load_geneval_prompts() for _ in range(k)]
    else:
        if not proto.prompts.file:
            raise FewstepError(f"protocol {proto.name} needs prompts.file: pass --set prompts.file=PATH")
        prompts = read_captions(repo_path(proto.prompts.file))
    n = num_images or proto.num_images or len(prompts)
    if n > len(prompts):
        raise FewstepError(f"protocol {proto.name} has {len(prompts)} prompts but {n} images were asked for: "
                           f"lower --num-images to at most {len(prompts)}")
    return prompts[:n]
