"""Load a Diffusers teacher (preset, folder or hub id) and wrap it in fewstep's convention."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Cond, Denoiser
from fewstep.models.families import family_for
from fewstep.models.families.base import Family

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"toy-digits": ASSETS / "toy-digits"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_pretrained(spec: str) -> str:
    """A builtin name, a local folder, or a hub id (refused while offline, with the fix)."""
    if spec in BUILTIN:
        path = BUILTIN[spec]
        if not (path / "model_index.json").is_file():
            raise FewstepError(f"builtin teacher {spec!r} is missing at {path}; regenerate it with "
                               "`python scripts/train_toy_teacher.py`")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FewstepError(f"{spec} is not a Diffusers pipeline folder (no model_index.json); pass a folder "
                               "written by `save_pretrained` or a preset name")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise FewstepError(f"teacher path {spec!r} does not exist; pass an existing pipeline folder or one of {sorted(BUILTIN)}")
    if hub_offline():
        raise FewstepError(f"{spec!r} looks like a hub id but HF_HUB_OFFLINE=1; download it first "
                           f"(`huggingface-cli download {spec}`) and pass the local folder, or unset HF_HUB_OFFLINE")
    return spec


def load_pipeline(spec: str, dtype: str = "float32", device: str | torch.device = "cpu", **components: Any) -> Any:
    """`components` replace (or fill empty slots of) the saved ones, as in `DiffusionPipeline.from_pretrained`."""
    from diffusers import DiffusionPipeline

    source = resolve_pretrained(spec)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=DTYPES[dtype], local_files_only=hub_offline(),
                                                 **components)
    except OSError as exc:
        raise FewstepError(f"cannot load pipeline {spec!r}: {str(exc).splitlines()[0]}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Teacher:
    """A loaded pipeline with its family glue; `denoiser(net)` wraps any network of the same architecture."""

    pipe: Any
    family: Family
    name: str
    autocast_dtype: torch.dtype | None = None   # bf16 autocast for sampling on CUDA (None = float32)
    experts: list = field(default_factory=list)  # phased students: [(adapter name or network, bound)], by time
    _schedule: tuple = field(default=(None, None), init=False, repr=False, compare=False)  # (scheduler, schedule)

    @property
    def net(self) -> nn.Module:
        return getattr(self.pipe, self.family.net_attr)

    @property
    def schedule(self) -> Schedule:
        """The family's schedule for the pipeline's current scheduler, built once per scheduler object (so its
        tables and memo are shared by every loop; swapping `pipe.scheduler` rebuilds it)."""
        scheduler, schedule = self._schedule
        if scheduler is not self.pipe.scheduler or schedule is None:
            schedule = self.family.schedule(self.pipe)
            self._schedule = (self.pipe.scheduler, schedule)
        return schedule

    @property
    def prediction(self) -> str:
        return self.family.prediction(self.pipe)

    @property
    def size(self) -> int:
        return self.family.default_size(self.pipe)

    def denoiser(self, net: nn.Module | None = None) -> nn.Module:
        den = Denoiser(net if net is not None else self.net, self.schedule, self.prediction, call=self.family.call,
                       autocast_dtype=self.autocast_dtype)
        if not self.experts:
            return den
        from fewstep.models.adapters import ExpertSwitch

        return ExpertSwitch(den, self.experts)

    def latent_shape(self, size: int | None = None) -> tuple[int, int, int]:
        s = size or self.size
        return self.family.latent_shape(self.pipe, s, s)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.family.encode_prompts(self.pipe, prompts)

    def null_cond(self, n: int) -> Cond:
        """The unconditional branch for n rows: every row is the same encoding (of "" or zeros), so it is encoded
        once and copied, instead of tokenising and encoding n empty prompts."""
        one = self.family.null_cond(self.pipe, 1)
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in one.items()}

    def teacher_times(self, steps: int, size: int | None = None) -> Tensor:
        s = size or self.size
        return self.family.teacher_times(self.pipe, steps, s, s)

    def student_times(self, steps: int, size: int | None = None) -> Tensor:
        """Default few-step grid: LCMScheduler's (999, 759, 499, 259 at 4 steps) on VP tables, the teacher's
        own shifted Euler grid on flow teachers. Ends at 0."""
        if self.schedule.kind != "vp":
            return self.teacher_times(steps, size)
        from diffusers import LCMScheduler

        sched = LCMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        n = sched.config.num_train_timesteps - 1
        return torch.cat([sched.timesteps.double() / n, torch.zeros(1, dtype=torch.float64)])


def load_teacher(spec: str, dtype: str = "float32", device: str | torch.device = "cpu", **components: Any) -> Teacher:
    pipe = load_pipeline(spec, dtype, device, **components)
    teacher = Teacher(pipe=pipe, family=family_for(pipe), name=spec)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    return teacher
