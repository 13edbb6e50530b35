"""`fewstep distill` / `scripts/distill.py`: config -> preflight -> teacher -> recipe -> trainer -> export.

`preflight` checks everything a run reads and writes (config, teacher, data, output folder, resume point)
before torch or any model loads; the output folder gets its first file (config.yaml) only once the teacher and
the recipe are built, so a failed start leaves nothing behind.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fewstep import paths
from fewstep.config import load_config, load_saved_config
from fewstep.errors import FewstepError, is_main_rank


@dataclass
class Plan:
    """What a validated `distill` call will do."""

    cfg: DictConfig
    resume: Path | None            # checkpoint to continue from (None: a fresh run)
    finished: bool = False         # resume=latest on a run that already reached train.steps and has its export
    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)   # settings the resume changes: saved, now


def teacher_reference(spec: str) -> str:
    """What the export records: builtin names and hub ids as given, local folders as absolute paths."""
    return spec if spec in paths.BUILTIN or not Path(spec).exists() else str(Path(spec).resolve())


def preflight(argv: list[str]) -> Plan:
    """Validate the whole run without loading anything heavy (well under a second); raises FewstepError."""
    cfg = load_config(argv)
    paths.resolve_pretrained(cfg.teacher.pretrained, role="teacher")
    check_data(cfg)
    if cfg.train.eval_every:
        from fewstep.eval.protocols import load_protocol

        load_protocol(cfg.train.eval_protocol, [])   # a bad name fails now, not after hours of training
    resume = plan_output(cfg)
    applied: dict[str, tuple[Any, Any]] = {}
    if resume is not None:
        from fewstep.train.checkpoint import verify_checkpoint

        state = verify_checkpoint(resume)
        applied = resume_changes(cfg, resume.parent.parent / "config.yaml")
        applied.update(check_global_batch(cfg, state.get("global_batch"), applied.pop("data.batch_size", None)))
    finished = (resume is not None and paths.checkpoint_step(resume) >= cfg.train.steps
                and paths.read_sidecar(Path(cfg.output_dir) / "export") is not None)
    return Plan(cfg, resume, finished, applied)


# Settings a resumed run may change: when and how much it logs, samples, evaluates and keeps, how long it trains
# (the LR schedule is rebuilt for the new length), its learning rate (applied to every role, keeping the
# schedule's position) and the per-process batch where the global batch stays the same (another process count).
# Every other difference from the run's config.yaml is refused: it would silently change the math of a run that
# claims to continue.
RESUMABLE = ("resume", "data.batch_size", "train.steps", "train.lr", "train.log_every", "train.sample_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.eval_protocol", "train.eval_num_images",
             "train.trackers", "train.progress", "train.max_nonfinite_steps", "sample.grid_size")


def resume_changes(cfg: DictConfig, saved_path: Path) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for the settings this resume changes (all in RESUMABLE); any other change is one
    FewstepError naming the key, both values and the fix."""
    if not saved_path.is_file():
        raise FewstepError(f"cannot resume: {saved_path} is missing (the run's config); resume a checkpoint inside "
                           "its run folder")
    saved, now = (_flat(OmegaConf.to_container(c, resolve=True)) for c in (load_saved_config(saved_path), cfg))
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys())
               if saved.get(k) != now.get(k) and k != "output_dir"}
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        k = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])})" if len(refused) > 1 else ""
        raise FewstepError(f"resume: {k} is {changed[k][1]!r} but the run was trained with {changed[k][0]!r}{more}; "
                           f"a resumed run keeps its training settings: set {k}={changed[k][0]} (or drop the "
                           "override), or start a new output_dir")
    return changed


def check_global_batch(cfg: DictConfig, saved: int | None,
                       changed: tuple[Any, Any] | None) -> dict[str, tuple[Any, Any]]:
    """A resume on another number of processes keeps the global batch (data.batch_size x processes x
    accumulation; `saved` is the checkpoint's): the draws are keyed by global position, so the run continues the
    same math. A changed data.batch_size is accepted only where it keeps the global batch the same;
    {"data.batch_size": ...} then."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    now = cfg.data.batch_size * world * cfg.train.gradient_accumulation_steps
    if saved is None:   # checkpoints written before the global batch was recorded: only the setting can be compared
        if changed is not None:
            raise FewstepError(f"resume: data.batch_size is {changed[1]} but the run was trained with {changed[0]}; "
                               f"set data.batch_size={changed[0]}, or start a new output_dir")
        return {}
    if now != saved:
        per = saved // (world * cfg.train.gradient_accumulation_steps)
        fix = (f"set data.batch_size={per}" if per * world * cfg.train.gradient_accumulation_steps == saved
               else f"use a number of processes that divides {saved}")
        raise FewstepError(f"resume: the global batch would be {now} (data.batch_size={cfg.data.batch_size} x {world} "
                           f"processes x {cfg.train.gradient_accumulation_steps} accumulation) but the run was trained "
                           f"with {saved}; {fix}, or start a new output_dir")
    return {} if changed is None else {"data.batch_size": changed}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 1e-4, ...} from a nested config."""
    if isinstance(d, dict) and d:
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: d}


def check_data(cfg: DictConfig) -> None:
    """data.path for folder / prompt sources, and the pairs cache of DMD's regression loss."""
    if cfg.data.source == "folder":
        meta = Path(cfg.data.path) / "metadata.jsonl"
        if not Path(cfg.data.path).is_dir():
            raise FewstepError(f"data.path={cfg.data.path} is not a folder; pass a folder of images with metadata.jsonl")
        if not meta.is_file() or not meta.read_text(encoding="utf-8", errors="replace").strip():
            raise FewstepError(f"data.path={cfg.data.path} has no (or an empty) metadata.jsonl; write one row per "
                               'image: {"file_name": "0001.png", "text": "a prompt"}')
    elif cfg.data.source == "prompts":
        paths.read_prompt_file(cfg.data.path)
    pairs = OmegaConf.select(cfg, "method.pairs_path", default="")
    if pairs and OmegaConf.select(cfg, "method.regression_weight", default=0) > 0 and not Path(pairs).is_dir():
        raise FewstepError(f"method.pairs_path={pairs} does not exist; write it with `fewstep pairs "
                           f"{cfg.teacher.pretrained} --out {pairs}`")


def plan_output(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run into an absent or empty folder. A folder that holds
    anything else is never reused without resume=..."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FewstepError(f"output_dir={out} is a file; pass a folder path")
    resume = paths.resolve_resume(cfg.resume, out)
    if resume is not None or not is_main_rank():   # the main process alone judges the folder: it may already
        return resume                              # have written config.yaml when a slower process gets here
    if out.is_dir() and any(out.iterdir()):
        what = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        if cfg.resume == "latest":
            raise FewstepError(f"resume=latest: {out} holds no complete checkpoint to continue ({what}); pass a new "
                               "output_dir")
        raise FewstepError(f"output_dir={out} is not empty ({what}); pass resume=latest to continue that run, or a "
                           "new output_dir")
    return None


def build_run(cfg: DictConfig, device: Any, stack: ExitStack | None = None) -> tuple[Any, Any, Any]:
    """Teacher, recipe and dataset. The attention backend is entered on `stack` before the recipe copies the
    network (full students and critics inherit its processors) and stays on while the stack is open (without a
    stack, for good)."""
    from fewstep.data.datasets import make_dataset
    from fewstep.models.attention import set_attention_backend
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes import build_recipe

    teacher = load_teacher(cfg.teacher.pretrained, cfg.teacher.dtype, device)
    if cfg.train.offload_frozen:
        teacher.offload_frozen()
    (stack or ExitStack()).enter_context(set_attention_backend(teacher.net, cfg.attention))
    size = cfg.teacher.resolution or teacher.size
    dataset = make_dataset(cfg.data.source, cfg.data.path, size, cfg.data.center_crop)
    recipe = build_recipe(cfg, teacher)
    return teacher, recipe, dataset


def make_accelerator(cfg: DictConfig) -> Any:
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from fewstep.train import zero

    fp16 = cfg.train.mixed_precision == "fp16"
    if fp16 and not torch.cuda.is_available():
        raise FewstepError("train.mixed_precision=fp16 needs a CUDA device (none here); use train.mixed_precision=bf16 "
                           "or no")
    # DDP: no per-forward buffer broadcast (the networks run many forwards per step, some on one process only,
    # for the preview) and no unused-parameter search (it forbids several forwards before one backward; see
    # fewstep.train.step.RoleOptimizers.backward). Schedules step with their optimizer, once per step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=list(cfg.train.trackers) or None,
                      project_dir=str(cfg.output_dir), kwargs_handlers=[ddp],
                      gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                      step_scheduler_with_optimizer=False)
    if fp16 and acc.device.type != "cuda":
        raise FewstepError(f"train.mixed_precision=fp16 needs a CUDA device (this run is on {acc.device.type}); use "
                           "train.mixed_precision=bf16 or no")
    if zero.is_deepspeed(acc):
        zero.configure(acc.state.deepspeed_plugin.deepspeed_config, cfg.data.batch_size,
                       cfg.train.gradient_accumulation_steps, cfg.train.grad_clip)
    return acc


def run(argv: list[str]) -> Path:
    plan = preflight(argv)
    cfg, out = plan.cfg, Path(plan.cfg.output_dir)
    if plan.finished:
        print(f"{out} already finished at step {paths.checkpoint_step(plan.resume)} (train.steps="
              f"{cfg.train.steps}); its export is {out / 'export'}. Raise train.steps to train on.")
        return out / "export"
    if cfg.resume == "latest" and plan.resume is None:
        print(f"resume=latest: no checkpoint in {out}; starting a fresh run", flush=True)
    from accelerate.utils import set_seed

    acc = make_accelerator(cfg)
    if acc.num_processes > 1:
        print(f"process {acc.process_index} of {acc.num_processes} ({acc.distributed_type.value}, {acc.device})",
              flush=True)
    set_seed(cfg.train.seed)
    from fewstep.train import zero
    from fewstep.train.trainer import Trainer

    tic = time.perf_counter()
    with ExitStack() as stack:
        zero.load_whole(acc)
        teacher, recipe, dataset = build_run(cfg, acc.device, stack)
        trainer = Trainer(cfg, recipe, teacher, dataset, acc)
        if plan.resume is not None:
            trainer.restore(plan.resume)
            changes = "".join(f"; {k}: {old} -> {new}" for k, (old, new) in plan.applied.items() if k != "resume")
            acc.print(f"resumed from {plan.resume} at step {trainer.step}{changes}")
        elif acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        acc.wait_for_everyone()
        if cfg.train.trackers:
            acc.init_trackers("fewstep", config=OmegaConf.to_container(cfg, resolve=True))
        trainer.fit()
        trainer.apply_ema()
        net = trainer.export_net()   # every process: sharded weights are gathered onto the main one
        acc.wait_for_everyone()   # leave together: a process tearing gloo down while another still samples can abort
        acc.end_training()        # trackers, then the process group
        if not acc.is_main_process:
            return out / "export"
        path = finish(cfg, trainer, teacher, recipe, net)
    print(summary(out, path, trainer.step, time.perf_counter() - tic))
    return path


def finish(cfg: DictConfig, trainer: Any, teacher: Any, recipe: Any, net: Any) -> Path:
    from fewstep.export import export_student
    from fewstep.train.report import plot_losses

    out = Path(cfg.output_dir)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    return export_student(teacher, net, recipe.inference(), out / "export", cfg.recipe,
                          teacher_reference(cfg.teacher.pretrained), {"train_steps": trainer.step})


def summary(out: Path, export: Path, step: int, seconds: float) -> str:
    """Where a finished run put what a person looks at, and the next command to try."""
    meta = paths.read_sidecar(export) or {}
    kind = "LoRA" if meta.get("lora") else "full weights"
    grids = sorted((out / "samples").glob("step-*.png"))
    ckpts = ", ".join(p.name for p in paths.list_checkpoints(out / "checkpoints"))
    rows = [("export", f"{export}  ({kind}, {meta.get('num_inference_steps')} steps, guidance "
                       f"{meta.get('guidance_scale')})"),
            ("samples", f"{grids[-1]}" + (f"  (and {len(grids) - 1} earlier grids)" if len(grids) > 1 else "")
             if grids else "-"),
            ("loss curve", str(out / "loss.png") if (out / "loss.png").is_file() else "-"),
            ("metrics", str(out / "metrics.jsonl")),
            ("checkpoints", f"{out / 'checkpoints'}/ ({ckpts})")]
    lines = [f"done: step {step} in {seconds / 60:.1f} min"] + [f"  {k:<12} {v}" for k, v in rows]
    lines.append(f"next: fewstep sample {export} --out samples/{out.name}")
    return "\n".join(lines)


def checkpoint_to_export(path: str) -> tuple[Path, Path]:
    """(run folder, checkpoint) for `fewstep export PATH`: a run folder means its newest complete checkpoint."""
    p = Path(path)
    usage = "pass a run folder (runs/x) or one of its checkpoints (runs/x/checkpoints/step-0001000)"
    if not p.exists():
        raise FewstepError(f"checkpoint path {path} does not exist; {usage}")
    if (p / "config.yaml").is_file():
        ck = paths.latest(p / "checkpoints")
        if ck is None:
            raise FewstepError(f"run folder {p} has no complete checkpoint to export yet")
        return p, ck
    if not (p / paths.STATE_FILE).is_file():
        raise FewstepError(f"{path} is neither a run folder (config.yaml) nor a complete checkpoint "
                           f"({paths.STATE_FILE}); {usage}")
    if not (p.parent.parent / "config.yaml").is_file():
        raise FewstepError(f"checkpoint {path} is not inside a run folder (no {p.parent.parent / 'config.yaml'}); "
                           f"{usage}")
    return p.parent.parent, p


def export_from_checkpoint(path: str, out_dir: str | None = None, overwrite: bool = False) -> Path:
    """Rebuild the export of any checkpoint: `fewstep export runs/x/checkpoints/step-0000200` (or a run folder,
    meaning its newest checkpoint), by default into `runs/x/exports/step-0000200`, outside the checkpoint folder
    that rotation may delete."""
    run_dir, ck = checkpoint_to_export(path)
    dest = paths.claim_output(Path(out_dir) if out_dir else run_dir / "exports" / ck.name, "--out", overwrite)
    cfg = load_saved_config(run_dir / "config.yaml")
    from accelerate import Accelerator

    from fewstep.export import export_student
    from fewstep.train.trainer import Trainer

    acc = Accelerator()
    teacher, recipe, dataset = build_run(cfg, acc.device)
    trainer = Trainer(cfg, recipe, teacher, dataset, acc)
    trainer.restore(ck)
    trainer.apply_ema()
    return export_student(teacher, recipe.export_net(), recipe.inference(), dest, cfg.recipe,
                          teacher_reference(cfg.teacher.pretrained), {"train_steps": trainer.step})


def main() -> None:  # scripts/distill.py
    import sys

    from fewstep.errors import guarded

    guarded(lambda: run(sys.argv[1:]))
