"""Load a Diffusers teacher (preset, folder or hub id) and wrap it in fewstep's convention."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedule import Schedule
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Cond, Denoiser
from fewstep.models.families import family_for
from fewstep.models.families.base import CALL_DEFAULTS_ATTR, Family
from fewstep.paths import CALL_DEFAULTS_KEY, PIPELINE_INDEX, hub_offline, read_sidecar, resolve_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(spec: str, dtype: str = "float32", device: str | torch.device = "cpu", **components: Any) -> Any:
    """`components` replace (or fill empty slots of) the saved ones, as in `DiffusionPipeline.from_pretrained`.

    Weights load from safetensors only (a pickle `.bin` in the folder is never read). Loads quietly: `dtype=`
    (diffusers' `torch_dtype=` is deprecated) and the diffusers and transformers loading progress bars off for the
    call, each put back as it was afterwards."""
    from diffusers import DiffusionPipeline

    source = resolve_pretrained(spec)
    folder = Path(source)
    meta = read_sidecar(folder) if folder.is_dir() and not (folder / PIPELINE_INDEX).is_file() else None
    if meta is not None:                                   # a LoRA export (resolve_pretrained admits no other kind)
        return fused_lora_pipeline(source, meta, dtype, device, **components)
    index = _local_index(source)
    components = {**empty_slots(index), **components}
    try:
        with quiet_hub_libraries():
            pipe = DiffusionPipeline.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=hub_offline(),
                                                     use_safetensors=True, **components)
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        fix = ("; fewstep reads safetensors weights only: re-save the pipeline with "
               "save_pretrained(..., safe_serialization=True)") if ".safetensors" in reason else ""
        raise FewstepError(f"cannot load pipeline {spec!r}: {reason}{fix}") from exc
    pipe.set_progress_bar_config(disable=True)
    if index.get(CALL_DEFAULTS_KEY):
        setattr(pipe, CALL_DEFAULTS_ATTR, dict(index[CALL_DEFAULTS_KEY]))
    return pipe.to(device)


def fused_lora_pipeline(source: str, meta: dict[str, Any], dtype: str, device: str | torch.device,
                        **components: Any) -> Any:
    """A LoRA export as a pipeline: the teacher it names with the adapter fused into the network (diffusers'
    `fuse_lora`, then the adapter layers removed), e.g. a stage-1 RTDMD student as the base of stage 2."""
    from fewstep.models.lora import load_lora

    pipe = load_pipeline(str(meta["teacher"]), dtype, device, **components)
    family = family_for(pipe)
    load_lora(family, pipe, source)
    net = getattr(pipe, family.net_attr)
    net.fuse_lora()
    net.unload_lora()
    return pipe


@contextmanager
def quiet_hub_libraries(warnings: bool = True) -> Iterator[None]:
    """The diffusers and transformers progress bars off for the block (loading and saving a pipeline print one per
    component), and with `warnings=False` diffusers' warnings too; each put back as it was afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    level = diffusers_logging.get_verbosity()
    for lib, _ in bars:
        lib.disable_progress_bar()
    if not warnings:
        diffusers_logging.set_verbosity(max(level, diffusers_logging.ERROR))
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()


def _local_index(source: str) -> dict[str, Any]:
    """A local pipeline folder's model_index.json ({} for a hub id)."""
    index = Path(source) / PIPELINE_INDEX
    return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}


def empty_slots(index: dict[str, Any]) -> dict[str, None]:
    """Components saved as empty slots (`[null, null]` in model_index.json, e.g. SD3's `text_encoder_3` without
    T5). diffusers writes them but refuses to load the folder back unless each is passed as None."""
    return {name: None for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry == [None, None]}


@dataclass
class Teacher:
    """A loaded pipeline with its family glue; `denoiser(net)` wraps any network of the same architecture."""

    pipe: Any
    family: Family
    name: str
    autocast_dtype: torch.dtype | None = None   # bf16 autocast for sampling on CUDA (None = float32)
    offload: bool = False   # frozen text encoders and VAE live in CPU memory between uses (see offload_frozen)
    grid_scheduler: Any = None   # where the sampling grids come from, when not pipe.scheduler (see grid_source)
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
        return Denoiser(net if net is not None else self.net, self.schedule, self.prediction, call=self.family.call,
                        autocast_dtype=self.autocast_dtype)

    def latent_shape(self, size: int | None = None) -> tuple[int, int, int]:
        s = size or self.size
        return self.family.latent_shape(self.pipe, s, s)

    def offload_frozen(self) -> None:
        """Keep the pipeline's text encoders and VAE in CPU memory, moved onto the denoiser's device only while
        they run (`encode_prompts`, `null_cond`, `encode_images`, `decode`): their memory on the accelerator is
        free for the networks being trained, at the cost of a host-to-device copy per use (the text-embedding
        cache makes text encoding rare)."""
        self.offload = True
        for module in self._frozen_parts("text_encoder", "vae"):
            module.to("cpu")

    def _frozen_parts(self, *prefixes: str) -> list[nn.Module]:
        """The pipeline's modules other than the denoiser whose component names start with one of `prefixes`
        (Diffusers names them text_encoder, text_encoder_2, ..., vae)."""
        return [m for name, m in self.pipe.components.items()
                if isinstance(m, nn.Module) and m is not self.net and name.startswith(prefixes)]

    @contextmanager
    def _on_device(self, *prefixes: str) -> Iterator[None]:
        """With `offload`, the frozen parts named by `prefixes` on the denoiser's device for the block, then back
        in CPU memory; without it, nothing moves."""
        parts = self._frozen_parts(*prefixes) if self.offload else []
        for module in parts:
            module.to(next(self.net.parameters()).device)
        try:
            yield
        finally:
            for module in parts:
                module.to("cpu")

    def encode_prompts(self, prompts: list[str]) -> Cond:
        with self._on_device("text_encoder"):
            return self.family.encode_prompts(self.pipe, prompts)

    def null_cond(self, n: int) -> Cond:
        """The unconditional branch for n rows: every row is the same encoding (of "" or zeros), so it is encoded
        once and copied, instead of tokenising and encoding n empty prompts."""
        with self._on_device("text_encoder"):
            one = self.family.null_cond(self.pipe, 1)
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in one.items()}

    def encode_images(self, images: Tensor, generator: Any = None) -> Tensor:
        """Images in [-1, 1] to the denoiser's latents (the family's VAE encoding, scaled and shifted)."""
        with self._on_device("vae"):
            return self.family.encode_images(self.pipe, images, generator)

    def decode(self, x0: Tensor, grad: bool = False) -> Tensor:
        """Latents to images in [0, 1] (the family's VAE decoding); `grad=True` keeps the graph back to x0."""
        with self._on_device("vae"):
            return self.family.decode(self.pipe, x0, grad)

    @property
    def grid_source(self) -> Any:
        """The scheduler the time grids derive from: the original teacher's. An export's own scheduler has
        shifting switched off (its stock call passes the already shifted sigmas), so a run whose teacher is an
        export (RTDMD stage 2) would otherwise derive an unshifted grid; the export's sidecar records the original
        scheduler (`teacher_scheduler`) and `load_teacher` puts it here."""
        return self.grid_scheduler if self.grid_scheduler is not None else self.pipe.scheduler

    @contextmanager
    def _grid_scheduler(self) -> Iterator[None]:
        """`pipe.scheduler` is the grid source for the block (the family functions read the pipeline's)."""
        own = self.pipe.scheduler
        self.pipe.scheduler = self.grid_source
        try:
            yield
        finally:
            self.pipe.scheduler = own

    def teacher_times(self, steps: int, size: int | None = None) -> Tensor:
        """The stock pipeline's `steps`-step grid (shift included) on the original teacher's scheduler."""
        s = size or self.size
        with self._grid_scheduler():
            return self.family.teacher_times(self.pipe, steps, s, s)

    def student_times(self, steps: int, size: int | None = None) -> Tensor:
        """Default few-step grid: LCMScheduler's (999, 759, 499, 259 at 4 steps) on VP tables, the teacher's
        own shifted Euler grid on flow teachers. Ends at 0."""
        if self.schedule.kind != "vp":
            return self.teacher_times(steps, size)
        from diffusers import LCMScheduler

        sched = LCMScheduler.from_config(self.grid_source.config)
        sched.set_timesteps(steps)
        n = sched.config.num_train_timesteps - 1
        return torch.cat([sched.timesteps.double() / n, torch.zeros(1, dtype=torch.float64)])


def load_teacher(spec: str, dtype: str = "float32", device: str | torch.device = "cpu", **components: Any) -> Teacher:
    pipe = load_pipeline(spec, dtype, device, **components)
    teacher = Teacher(pipe=pipe, family=family_for(pipe), name=spec, grid_scheduler=recorded_grid_scheduler(spec))
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    return teacher


def recorded_grid_scheduler(spec: str) -> Any:
    """The original teacher's scheduler recorded in an export's sidecar (`teacher_scheduler`), None for anything
    else (a preset, a pipeline folder, a hub id, an export written before the field existed)."""
    folder = Path(spec).expanduser()
    meta = read_sidecar(folder) if folder.is_dir() else None
    record = (meta or {}).get("teacher_scheduler")
    if not record:
        return None
    import diffusers

    cls = getattr(diffusers, str(record.get("class")), None)
    if cls is None:
        raise FewstepError(f"{folder}/fewstep.json names teacher_scheduler class {record.get('class')!r}, which "
                           "this diffusers does not have; upgrade diffusers or re-export the run")
    return cls.from_config(record["config"])
