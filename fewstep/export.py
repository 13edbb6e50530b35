"""Export a trained student as plain Diffusers files plus a `fewstep.json` sidecar.

LoRA students are written with the pipeline's own `save_lora_weights` (with the adapter's alpha metadata, so
`load_lora_weights` restores the exact scale); full students as a complete `save_pretrained` pipeline whose
scheduler is already the student's. `fewstep.json` records how to run it in a stock pipeline: the scheduler class
and config, the integer timesteps (or sigmas), the guidance scale and the LoRA settings. Phased students add one
folder per expert, listed under `experts` with its kind ("lora", the default, or "full").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.models.adapters import expert_network
from fewstep.models.student import has_lora, lora_config_dict
from fewstep.models.teacher import Teacher, load_teacher, quiet_hub_libraries
from fewstep.models.families.base import recorded_call_defaults
from fewstep.paths import CALL_DEFAULTS_KEY, EXPORT_MARK, PIPELINE_INDEX, SIDECAR, read_sidecar, staged_output
from fewstep.recipes.base import InferenceSpec
from fewstep.sampling.steps import parse_step


def export_student(teacher: Teacher, net: nn.Module, spec: InferenceSpec, out_dir: Path, recipe: str,
                   teacher_name: str, extra: dict[str, Any] | None = None) -> Path:
    """Write the export atomically (a temporary folder renamed into place; an older export is replaced only
    after the new one is complete). Phased students write one folder per expert (algorithms.md §4.1): a LoRA
    file, or a full network next to one shared pipeline holding everything else."""
    from fewstep.models.lora import save_lora

    fam = teacher.family
    sched_name, sched_config = fam.student_scheduler(teacher.pipe, spec.step)
    lora = lora_config_dict(net) if has_lora(net) else None
    kinds: list[str] = []
    with staged_output(out_dir) as tmp:
        if spec.experts:
            kinds = save_experts(teacher, net, [name for name, _ in spec.experts], sched_name, sched_config, tmp)
        elif lora is not None:
            save_lora(fam, net, tmp)
        else:
            save_full_pipeline(teacher, net, sched_name, sched_config, tmp)
        meta = sidecar(teacher, spec, (sched_name, sched_config), recipe, teacher_name, lora, kinds, extra)
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def sidecar(teacher: Teacher, spec: InferenceSpec, scheduler: tuple[str, dict], recipe: str, teacher_name: str,
            lora: dict | None, kinds: list[str], extra: dict[str, Any] | None) -> dict[str, Any]:
    """fewstep.json: how to run the export in a stock pipeline (scheduler, timesteps, guidance, LoRA, experts)."""
    fam, pipe, size = teacher.family, teacher.pipe, teacher.size
    sched_name, sched_config = scheduler
    times = torch.tensor(spec.times, dtype=torch.float64)
    return {"recipe": recipe, "teacher": teacher_name, "family": fam.name,
            "scheduler": {"class": sched_name, "config": _jsonable(sched_config)},
            "teacher_scheduler": {"class": type(teacher.grid_source).__name__,
                                  "config": _jsonable(dict(teacher.grid_source.config))},
            "timesteps": fam.student_timesteps(pipe, times, size, size), "times": [float(t) for t in times],
            "step": spec.step, "step_options": parse_step(spec.step)[1], "num_inference_steps": len(spec.times) - 1, "guidance_scale": spec.guidance_scale,
            "experts": [{"adapter": name, "until": bound, "kind": kind}
                        for (name, bound), kind in zip(spec.experts, kinds)],
            "resolution": size, "pipeline_kwargs": stock_call_kwargs(teacher, times, spec.guidance_scale),
            "lora": None if lora is None else {
                "rank": lora["r"], "alpha": lora["lora_alpha"], "targets": sorted(lora["target_modules"])},
            **(extra or {})}


def stock_call_kwargs(teacher: Teacher, times: torch.Tensor, guidance_scale: float) -> dict[str, Any]:
    """Everything a stock `pipe(prompt, **kwargs)` call of the export needs besides its scheduler: the timesteps or
    sigmas, the guidance scale and the arguments recorded with the teacher (the SD3 toy's max_sequence_length)."""
    size = teacher.size
    return {**recorded_call_defaults(teacher.pipe), **teacher.family.pipeline_call_kwargs(teacher.pipe, times, size, size),
            "guidance_scale": guidance_scale}


def save_experts(teacher: Teacher, net: nn.Module, names: list[str], sched_name: str, sched_config: dict,
                 out: Path) -> list[str]:
    """Each phase expert under `out/<name>/` and its kind: "lora" (a stock LoRA file for the teacher) or "full" (the
    network's own `save_pretrained` folder; the pipeline's other parts and the student scheduler are then written
    once at `out`, with an empty network slot)."""
    from fewstep.models.lora import save_lora

    kinds = []
    for name in names:
        expert = expert_network(net, name)
        if expert is None:
            save_lora(teacher.family, net, out / name, adapter_name=name)
        else:
            expert.save_pretrained(str(out / name), safe_serialization=True)
        kinds.append("lora" if expert is None else "full")
    if "full" in kinds:
        save_full_pipeline(teacher, None, sched_name, sched_config, out)
    return kinds


def save_full_pipeline(teacher: Teacher, net: nn.Module | None, sched_name: str, sched_config: dict, out: Path) -> None:
    """The teacher pipeline with `net` as its network (None: left empty, for full phase experts) and the student's
    scheduler, as a `save_pretrained` folder."""
    import diffusers

    pipe = teacher.pipe
    components = dict(pipe.components)
    components[teacher.family.net_attr] = net
    components["scheduler"] = getattr(diffusers, sched_name).from_config(sched_config)
    if "requires_safety_checker" in pipe.config:   # keep the teacher's setting (the default True warns on None)
        components["requires_safety_checker"] = pipe.config.requires_safety_checker
    # an empty slot (SD3 without T5, a phased export's network) makes diffusers warn that None "cannot be saved"
    with quiet_hub_libraries(warnings=all(v is not None for v in components.values())):
        type(pipe)(**components).save_pretrained(str(out), safe_serialization=True)
    index = out / PIPELINE_INDEX      # mark the folder, so it is never taken for a teacher if fewstep.json is lost
    recorded = {CALL_DEFAULTS_KEY: calls} if (calls := recorded_call_defaults(pipe)) else {}
    index.write_text(json.dumps({**json.loads(index.read_text()), EXPORT_MARK: SIDECAR, **recorded}, indent=2,
                                sort_keys=True) + "\n")


def _jsonable(config: dict) -> dict:
    """A scheduler config as plain JSON. diffusers' `_use_default_values` is a set listed in the process's hash
    order: sorted here, so the same run always writes the same sidecar."""
    config = {k: sorted(v) if k == "_use_default_values" else v for k, v in config.items()}
    return json.loads(json.dumps(config, default=lambda o: list(o) if hasattr(o, "__iter__") else str(o)))


def load_export(path: Path, device: str | torch.device = "cpu") -> tuple[Teacher, InferenceSpec, dict[str, Any]]:
    """An export folder -> (teacher bundle whose network is the student, its sampler, the sidecar)."""
    meta = read_sidecar(path)
    if meta is None:
        raise FewstepError(f"{path} has no {SIDECAR}; pass an export folder written by fewstep")
    experts: list[tuple[Any, float]] = []
    if meta.get("experts"):
        teacher, experts = load_phased(Path(path), meta, device)
    elif meta.get("lora"):
        from fewstep.models.lora import load_lora

        teacher = load_teacher(meta["teacher"], device=device)
        load_lora(teacher.family, teacher.pipe, path)
    else:
        teacher = load_teacher(str(path), device=device)
    spec = InferenceSpec(times=meta["times"], step=meta["step"], guidance_scale=meta["guidance_scale"],
                         experts=experts)
    return teacher, spec, meta


def load_phased(path: Path, meta: dict[str, Any], device: str | torch.device) -> tuple[Teacher, list[tuple[Any, float]]]:
    """(bundle, experts for the InferenceSpec) of a phased export (algorithms.md §4.1): LoRA experts load as named
    adapters into the original teacher; full experts are networks of their own, loaded into the export's shared
    pipeline (the first one fills its empty network slot)."""
    experts = meta["experts"]
    kinds = {e.get("kind", "lora") for e in experts}
    if kinds not in ({"lora"}, {"full"}):
        raise FewstepError(f"{path / SIDECAR} has expert kinds {sorted(kinds)}; expected all 'lora' or all 'full' "
                           "(re-export with `fewstep export <checkpoint>`)")
    if kinds == {"lora"}:
        from fewstep.models.lora import load_lora

        teacher = load_teacher(meta["teacher"], device=device)
        for e in experts:
            load_lora(teacher.family, teacher.pipe, path / e["adapter"], adapter_name=e["adapter"])
        keys: list[Any] = [e["adapter"] for e in experts]
    else:
        from fewstep.models.families import FAMILIES

        keys = [load_network(path / e["adapter"], device) for e in experts]
        teacher = load_teacher(str(path), device=device, **{FAMILIES[meta["family"]].net_attr: keys[0]})
    return teacher, [(key, float(e["until"])) for key, e in zip(keys, experts)]


def load_network(folder: Path, device: str | torch.device) -> nn.Module:
    """A network folder written by `save_pretrained` (its class is named in config.json), frozen, on `device`."""
    import diffusers

    config = folder / "config.json"
    if not config.is_file():
        raise FewstepError(f"{folder} holds no network (no config.json); re-export with `fewstep export <checkpoint>`")
    cls = getattr(diffusers, json.loads(config.read_text())["_class_name"])
    return cls.from_pretrained(str(folder)).to(device).requires_grad_(False).eval()
