"""Run configuration: a typed schema per recipe plus OmegaConf, strict about unknown keys and wrong types.

`recipe=lcm model=sdxl train.steps=100` merges, in order: the schema defaults, `recipes/<recipe>.yaml`,
`recipes/models/<model>.yaml`, `recipes/<recipe>/<model>.yaml` (if present), `recipes/<recipe>/<model>.<mode>.yaml`
for the run's `student.mode` (if present: the tuned settings of a LoRA or a full student, so `student.mode=lora`
alone switches to them), then the dotted CLI overrides.
Configs never reach inside classes: builders read them and pass typed keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fewstep.errors import FewstepError
from fewstep.methods import METHOD_CHOICES, METHOD_RULES, METHODS

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TeacherConfig:
    pretrained: str = "toy-digits"      # preset asset name, a Diffusers pipeline folder, or a hub id
    dtype: str = "float32"              # weights dtype of the frozen teacher: float32 | bfloat16 | float16
    resolution: int = 0                 # 0 = the family's default size


@dataclass
class DataConfig:
    source: str = "digits"              # digits | folder (images + metadata.jsonl) | prompts (text file)
    path: str = ""                      # folder or prompt file for source=folder/prompts
    batch_size: int = 32
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
    adam_eps: float = 1e-8              # AdamW's epsilon (its first step is lr * g / (|g| + eps): a sign step)
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
    max_nonfinite_steps: int = 10       # this many steps in a row with a non-finite loss or gradient stop the run
    text_embedding_cache: bool = True   # keep each distinct prompt's encoding (frozen text encoders) in memory
    offload_frozen: bool = False        # text encoders and VAE in CPU memory, on the device only while they run
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
    except Exception as exc:  # yaml.YAMLError and friends: one line with the line and column, no traceback
        raise FewstepError(f"malformed YAML in {path}{_where(exc)}; fix the file's syntax") from exc
    if not isinstance(cfg, DictConfig):
        raise FewstepError(f"{path} must hold a mapping of keys, not a {type(cfg).__name__}")
    return cfg


def _where(exc: Exception) -> str:
    """': line 3, column 7: expected ',' or ']'' for a YAML error (PyYAML's problem mark is 0-based)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None:
        return f": {str(exc).splitlines()[0]}"
    return f": line {mark.line + 1}, column {mark.column + 1}: {problem or 'syntax error'}"


YAML_WORDS = {"no", "yes", "on", "off", "y", "n"}


def _keep_word(arg: str) -> str:
    """`train.mixed_precision=no` stays the string "no" (YAML 1.1 would read it as False, which a string setting
    then holds as "False"); boolean settings still accept no/yes/on/off, which OmegaConf reads as booleans."""
    key, _, value = arg.partition("=")
    return f"{key}='{value}'" if value.lower() in YAML_WORDS else arg


def _parse_cli(argv: list[str]) -> DictConfig:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise FewstepError(f"arguments must be key=value (got {bad[0]!r}); e.g. recipe=lcm model=toy-digits train.steps=200")
    try:
        return OmegaConf.from_dotlist([_keep_word(a) for a in argv])
    except Exception as exc:  # OmegaConf and YAML errors in a value such as 'train.betas=[0.9'
        raise FewstepError(f"cannot parse overrides {' '.join(argv)}{_where(exc)}") from exc


def recipe_file(recipe: str, recipe_dir: Path) -> tuple[str, Path]:
    """(recipe name, its YAML): `recipe=dmd2`, `recipe=dmd2.yaml`, or a path to a YAML file of your own
    (`recipe=configs/my_dmd2.yaml` or `recipe=configs/my_dmd2`; its name is the file's stem)."""
    name = recipe.removesuffix(".yaml")
    for path in (recipe_dir / f"{name}.yaml", Path(f"{name}.yaml").expanduser()):
        if path.is_file():
            return (name if path.parent.resolve() == recipe_dir.resolve() else path.stem), path
    raise FewstepError(f"unknown recipe {recipe!r}; choose one of {available()} (files in {recipe_dir}) or pass the "
                       "path of a YAML file")


def load_config(argv: list[str], methods: dict[str, type] | None = None, recipe_dir: Path | None = None) -> DictConfig:
    """`recipe=lcm model=sdxl train.steps=100` -> validated, read-only config (raises FewstepError on bad input).
    Checks keys, types, choices and ranges; never touches the teacher, the data or the output folder (see
    `fewstep.distill.preflight` for those)."""
    methods = methods or METHODS
    recipe_dir = recipe_dir or RECIPE_DIR
    cli = _parse_cli(argv)
    recipe, path = recipe_file(str(cli.get("recipe", "lcm")), recipe_dir)
    layers = [_load_yaml(path)]
    model = str(cli.get("model", layers[0].get("model", "toy-digits")))
    model_file = recipe_dir / "models" / f"{model}.yaml"
    if not model_file.is_file():
        raise FewstepError(f"unknown model {model!r}; choose one of {available('models')}")
    layers.append(_load_yaml(model_file))
    pair_file = recipe_dir / recipe / f"{model}.yaml"
    if pair_file.is_file():
        layers.append(_load_yaml(pair_file))
    mode_file = recipe_dir / recipe / f"{model}.{_student_mode(layers, cli)}.yaml"
    if mode_file.is_file():
        layers.append(_load_yaml(mode_file))
    return _validate(layers, cli, recipe, model, methods)


def _student_mode(layers: list[DictConfig], cli: DictConfig) -> str:
    """The run's `student.mode` before the mode layer: the command line's, else the last layer that sets it, else
    the schema default."""
    for layer in (cli, *reversed(layers)):
        mode = OmegaConf.select(layer, "student.mode")
        if mode is not None:
            return str(mode)
    return StudentConfig().mode


def load_saved_config(path: Path) -> DictConfig:
    """The config.yaml a run wrote at its start, validated against today's schema."""
    raw = _load_yaml(Path(path))
    return _validate([raw], OmegaConf.create({}), str(raw.get("recipe")), str(raw.get("model")), METHODS)


def _validate(layers: list[DictConfig], cli: DictConfig, recipe: str, model: str, methods: dict[str, type]) -> DictConfig:
    try:
        merged_raw = OmegaConf.merge(*layers, cli)
    except OmegaConfBaseException as exc:
        raise FewstepError(f"cannot merge the config layers: {str(exc).splitlines()[0]}") from exc
    algorithm = str(merged_raw.get("algorithm", recipe))
    if algorithm not in methods:
        raise FewstepError(f"unknown algorithm {algorithm!r} in recipe {recipe!r}; known: {sorted(methods)}")
    schema = OmegaConf.structured(RunConfig(method=methods[algorithm]()))
    try:
        cfg = OmegaConf.merge(schema, *layers, cli, {"recipe": recipe, "model": model, "algorithm": algorithm})
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise FewstepError(_explain(exc, schema)) from exc
    check_values(cfg)
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


# diffusers.optimization.SchedulerType's values (tests/test_config.py checks this list against diffusers).
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant")

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("digits", "folder", "prompts"),
    "student.mode": ("lora", "full"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.lr_schedule": LR_SCHEDULES,
    "teacher.dtype": ("float32", "bfloat16", "float16"),
    "attention": ("sdpa", "flash", "efficient", "math", "xformers"),
}

# Lower bounds (inclusive) of numeric settings; `sample.guidance_scale` follows the stock pipelines, where a scale
# of 1 switches CFG off and values below 1 are not guidance.
AT_LEAST: dict[str, float] = {
    "train.steps": 1, "data.batch_size": 1, "sample.steps": 1, "train.gradient_accumulation_steps": 1,
    "train.log_every": 1, "sample.grid_size": 1, "train.eval_num_images": 1, "student.lora.rank": 1,
    "train.warmup_steps": 0, "train.sample_every": 0, "train.checkpoint_every": 0, "train.eval_every": 0,
    "train.keep_checkpoints": 0, "teacher.resolution": 0, "train.weight_decay": 0,
    "train.grad_clip": 0, "sample.guidance_scale": 1,
}
POSITIVE = ("train.lr", "train.adam_eps", "student.lora.alpha")


def check_values(cfg: DictConfig) -> None:
    """Every choice and range of the run and its method, so a bad value fails at load, not at step N."""
    for key, allowed in CHOICES.items():
        _check_choice(key, OmegaConf.select(cfg, key), allowed)
    if cfg.data.source != "digits" and (OmegaConf.is_missing(cfg.data, "path") or cfg.data.path in ("", "???")):
        kind = "a folder of images with metadata.jsonl" if cfg.data.source == "folder" else "a prompt file"
        raise FewstepError(f"data.path is required for data.source={cfg.data.source}: pass data.path=<{kind}>")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FewstepError(f"config key {missing[0]} must be set for recipe={cfg.recipe}: pass {missing[0]}=<value>")
    for key, low in AT_LEAST.items():
        if OmegaConf.select(cfg, key) < low:
            raise FewstepError(f"{key} must be >= {low:g} (got {OmegaConf.select(cfg, key)})")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise FewstepError(f"{key} must be > 0 (got {OmegaConf.select(cfg, key)})")
    betas = list(cfg.train.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise FewstepError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999] (got {betas})")
    if not 0 <= cfg.train.ema_decay < 1:
        raise FewstepError(f"train.ema_decay must be in [0, 1) (0 = no EMA; got {cfg.train.ema_decay})")
    times = list(cfg.sample.timesteps)
    if any(not 0 < t <= 1 for t in (times[:-1] if times and times[-1] == 0 else times)):
        raise FewstepError(f"sample.timesteps are times in (0, 1] (1 = pure noise), e.g. [0.999, 0.5]; got {times}")
    if any(a <= b for a, b in zip(times, times[1:])):
        raise FewstepError(f"sample.timesteps must decrease towards 0, e.g. [0.999, 0.5]; got {times}")
    check_method(cfg)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FewstepError(f"bad value {key}={value!r}; choose one of {list(allowed)}")


def check_method(cfg: DictConfig) -> None:
    """The algorithm's own settings: string choices, step ratios, time ranges and cross-setting rules."""
    method = cfg.method
    for key, allowed in METHOD_CHOICES.get(cfg.algorithm, {}).items():
        _check_choice(f"method.{key}", method[key], allowed)
    for key in method:
        if key.startswith("critic_steps_per") and method[key] < 1:
            raise FewstepError(f"method.{key} must be >= 1 (got {method[key]})")
        if key.endswith("_t_min") and f"{key[:-4]}_t_max" in method:
            lo, hi = method[key], method[f"{key[:-4]}_t_max"]
            if not 0 <= lo < hi <= 1:
                raise FewstepError(f"method.{key} and method.{key[:-4]}_t_max must satisfy 0 <= min < max <= 1 "
                                   f"(got {lo}, {hi})")
    rules = METHOD_RULES.get(cfg.algorithm)
    if rules is not None:
        rules(method, cfg)
