"""Run configuration: a typed schema per recipe plus OmegaConf, strict about unknown keys and wrong types.

`recipe=lcm model=sdxl train.steps=100` merges, in order: the schema defaults, `recipes/<recipe>.yaml`,
`recipes/models/<model>.yaml`, `recipes/<recipe>/<model>.yaml` (if present), then the dotted CLI overrides.
Configs never reach inside classes: builders read them and pass typed keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fewstep.errors import FewstepError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TeacherConfig:
    pretrained: str = "toy-digits"      # preset asset name, a Diffusers pipeline folder, or a hub id
    dtype: str = "float32"              # weights dtype of the frozen teacher: float32 | bfloat16 | float16
    resolution: int = 0                 # 0 = the family's default size
    guidance_scale: float = 1.0         # teacher CFG (Imagen convention, 1 = off) where a recipe uses a fixed one


@dataclass
class DataConfig:
    source: str = "digits"              # digits | folder (images + metadata.jsonl) | prompts (text file)
    path: str = ""                      # folder or prompt file for source=folder/prompts
    batch_size: int = 32
    num_workers: int = 0
    center_crop: bool = True


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=list)   # empty = the family's defaults
    init_scale: float = 0.0                             # >0: random non-zero lora_B (tests only)


@dataclass
class StudentConfig:
    mode: str = "lora"                  # lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0
    grad_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"         # no | bf16 | fp16 (accelerate)
    ema_decay: float = 0.0              # >0: keep an EMA of the student (exported instead of the raw weights)
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0               # 0 = only at the end
    checkpoint_every: int = 0           # 0 = only at the end
    eval_every: int = 0                 # >0: score the student with eval_protocol every N steps (and at the end)
    eval_protocol: str = "toy-digits"   # a preset of eval/protocols/ (fewstep eval --protocol)
    eval_num_images: int = 200
    keep_checkpoints: int = 2
    trackers: list[str] = field(default_factory=list)   # accelerate trackers, e.g. [tensorboard]
    progress: bool = True


@dataclass
class SampleConfig:
    steps: int = 4                      # the student's steps
    timesteps: list[float] = field(default_factory=list)  # explicit student times in [0, 1] (empty = default grid)
    guidance_scale: float = 1.0         # CFG at student inference (1 = off)
    grid_size: int = 16                 # images in periodic sample grids


@dataclass
class RunConfig:
    recipe: str = "lcm"
    algorithm: str = "lcm"
    model: str = "toy-digits"
    output_dir: str = "runs/default"
    resume: str = ""                    # "" | latest | path to a checkpoint folder
    attention: str = "sdpa"             # sdpa | flash | efficient | math | xformers
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    method: Any = None                  # replaced by the recipe's own Config dataclass


def available(subdir: str = "") -> list[str]:
    folder = RECIPE_DIR / subdir
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: one line, no traceback
        raise FewstepError(f"malformed YAML in {path}: {str(exc).splitlines()[0]}; fix the file's syntax") from exc
    if not isinstance(cfg, DictConfig):
        raise FewstepError(f"{path} must hold a mapping of keys, not a {type(cfg).__name__}")
    return cfg


def _parse_cli(argv: list[str]) -> DictConfig:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise FewstepError(f"arguments must be key=value (got {bad[0]!r}); e.g. recipe=lcm model=toy-digits train.steps=200")
    try:
        return OmegaConf.from_dotlist(argv)
    except OmegaConfBaseException as exc:
        raise FewstepError(f"cannot parse overrides {argv}: {exc.msg if hasattr(exc, 'msg') else exc}") from exc


def load_config(argv: list[str], recipes: dict[str, type] | None = None, recipe_dir: Path | None = None) -> DictConfig:
    """`recipe=lcm model=sdxl train.steps=100` -> validated, read-only config (raises FewstepError on bad input)."""
    from fewstep.recipes import RECIPES

    recipes = recipes or RECIPES
    recipe_dir = recipe_dir or RECIPE_DIR
    cli = _parse_cli(argv)
    recipe = str(cli.get("recipe", "lcm"))
    recipe_file = recipe_dir / f"{recipe}.yaml"
    if not recipe_file.is_file():
        raise FewstepError(f"unknown recipe {recipe!r}; choose one of {available()} (files in {recipe_dir})")
    layers = [_load_yaml(recipe_file)]
    model = str(cli.get("model", layers[0].get("model", "toy-digits")))
    model_file = recipe_dir / "models" / f"{model}.yaml"
    if not model_file.is_file():
        raise FewstepError(f"unknown model {model!r}; choose one of {available('models')}")
    layers.append(_load_yaml(model_file))
    pair_file = recipe_dir / recipe / f"{model}.yaml"
    if pair_file.is_file():
        layers.append(_load_yaml(pair_file))
    return _validate(layers, cli, recipe, model, recipes)


def load_saved_config(path: Path) -> DictConfig:
    """The config.yaml a run wrote at its start, validated against today's schema."""
    from fewstep.recipes import RECIPES

    raw = _load_yaml(Path(path))
    return _validate([raw], OmegaConf.create({}), str(raw.get("recipe")), str(raw.get("model")), RECIPES)


def _validate(layers: list[DictConfig], cli: DictConfig, recipe: str, model: str, recipes: dict[str, type]) -> DictConfig:
    merged_raw = OmegaConf.merge(*layers, cli)
    algorithm = str(merged_raw.get("algorithm", recipe))
    if algorithm not in recipes:
        raise FewstepError(f"unknown algorithm {algorithm!r} in recipe {recipe!r}; known: {sorted(recipes)}")
    schema = OmegaConf.structured(RunConfig(method=recipes[algorithm].Config()))
    try:
        cfg = OmegaConf.merge(schema, *layers, cli, {"recipe": recipe, "model": model, "algorithm": algorithm})
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise FewstepError(_explain(exc, schema)) from exc
    check_choices(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _explain(exc: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"unknown config key {key!r}; valid keys{' under ' + parent if parent else ''}: {valid}"
    return f"bad value for {key!r}: {msg}"


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("digits", "folder", "prompts"),
    "student.mode": ("lora", "full"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "teacher.dtype": ("float32", "bfloat16", "float16"),
    "attention": ("sdpa", "flash", "efficient", "math", "xformers"),
}


def check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise FewstepError(f"bad value {key}={value!r}; choose one of {list(allowed)}")
    if cfg.data.source != "digits" and (OmegaConf.is_missing(cfg.data, "path") or cfg.data.path in ("", "???")):
        kind = "a folder of images with metadata.jsonl" if cfg.data.source == "folder" else "a prompt file"
        raise FewstepError(f"data.path is required for data.source={cfg.data.source}: pass data.path=<{kind}>")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FewstepError(f"config key {missing[0]} must be set for recipe={cfg.recipe}: pass {missing[0]}=<value>")
    for key in ("train.steps", "data.batch_size", "sample.steps", "train.gradient_accumulation_steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise FewstepError(f"{key} must be >= 1 (got {OmegaConf.select(cfg, key)})")


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def dump_schema(recipe_cls: Optional[type] = None) -> str:
    schema = OmegaConf.structured(RunConfig(method=recipe_cls.Config() if recipe_cls else None))
    return OmegaConf.to_yaml(schema)
