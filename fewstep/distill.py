"""`fewstep distill` / `scripts/distill.py`: config -> teacher -> recipe -> trainer -> export."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fewstep.config import load_config, load_saved_config
from fewstep.errors import FewstepError
from fewstep.models.attention import set_attention_backend
from fewstep.models.teacher import BUILTIN, Teacher, load_teacher
from fewstep.train import checkpoint as ckpt


def teacher_reference(spec: str) -> str:
    """What the export records: builtin names and hub ids as given, local folders as absolute paths."""
    return spec if spec in BUILTIN or not Path(spec).exists() else str(Path(spec).resolve())


def prepare_output(cfg: DictConfig) -> Path | None:
    """Refuse to clobber a previous run; return the checkpoint to resume from (if any)."""
    out = Path(cfg.output_dir)
    resume = ckpt.resolve_resume(cfg.resume, out)
    if resume is None and ckpt.list_checkpoints(out / "checkpoints") and cfg.resume != "latest":
        raise FewstepError(f"{out} already holds checkpoints; pass resume=latest to continue it, or a new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    if resume is None:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return resume


def build_run(cfg: DictConfig, device: Any, stack: ExitStack | None = None) -> tuple[Teacher, Any, Any]:
    """Teacher, recipe and dataset. The attention backend is entered on `stack` before the recipe copies the
    network (full students and critics inherit its processors) and stays on while the stack is open (without a
    stack, for good)."""
    from fewstep.data.datasets import make_dataset
    from fewstep.recipes import build_recipe

    teacher = load_teacher(cfg.teacher.pretrained, cfg.teacher.dtype, device)
    (stack or ExitStack()).enter_context(set_attention_backend(teacher.net, cfg.attention))
    size = cfg.teacher.resolution or teacher.size
    dataset = make_dataset(cfg.data.source, cfg.data.path, size, cfg.data.center_crop)
    recipe = build_recipe(cfg, teacher)
    return teacher, recipe, dataset


def run(argv: list[str]) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = load_config(argv)
    if cfg.train.eval_every:
        from fewstep.eval.protocols import load_protocol

        load_protocol(cfg.train.eval_protocol, [])   # a bad name fails now, not after hours of training
    out = Path(cfg.output_dir)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=list(cfg.train.trackers) or None,
                      project_dir=str(out))
    if acc.num_processes > 1:
        print(f"process {acc.process_index} of {acc.num_processes} ({acc.distributed_type.value}, {acc.device})",
              flush=True)
    set_seed(cfg.train.seed)
    resume = prepare_output(cfg) if acc.is_main_process else ckpt.resolve_resume(cfg.resume, out)
    if cfg.train.trackers:
        acc.init_trackers("fewstep", config=OmegaConf.to_container(cfg, resolve=True))
    from fewstep.train.trainer import Trainer

    with ExitStack() as stack:
        teacher, recipe, dataset = build_run(cfg, acc.device, stack)
        trainer = Trainer(cfg, recipe, teacher, dataset, acc)
        if resume is not None:
            trainer.restore(resume)
            acc.print(f"resumed from {resume} at step {trainer.step}")
        trainer.fit()
        acc.end_training()
        if not acc.is_main_process:
            return out / "export"
        return finish(cfg, trainer, teacher, recipe)


def finish(cfg: DictConfig, trainer: Any, teacher: Teacher, recipe: Any) -> Path:
    from fewstep.export import export_student
    from fewstep.train.report import plot_losses

    out = Path(cfg.output_dir)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    trainer.apply_ema()
    path = export_student(teacher, recipe.export_net(), recipe.inference(), out / "export", cfg.recipe,
                          teacher_reference(cfg.teacher.pretrained), {"train_steps": trainer.step})
    print(f"export written to {path}")
    return path


def export_from_checkpoint(path: str, out_dir: str | None = None) -> Path:
    """Rebuild the export of any checkpoint: `fewstep export runs/x/checkpoints/step-0000200` (or a run folder,
    meaning its newest checkpoint)."""
    from accelerate import Accelerator

    p = Path(path)
    run_dir = p if (p / "config.yaml").is_file() else p.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise FewstepError(f"{path} is neither a run folder nor a checkpoint inside one (no config.yaml found)")
    ck = ckpt.latest(p / "checkpoints") if p == run_dir else p
    if ck is None:
        raise FewstepError(f"{run_dir} has no complete checkpoint to export")
    cfg = load_saved_config(run_dir / "config.yaml")
    acc = Accelerator()
    teacher, recipe, dataset = build_run(cfg, acc.device)
    from fewstep.export import export_student
    from fewstep.train.trainer import Trainer

    trainer = Trainer(cfg, recipe, teacher, dataset, acc)
    trainer.restore(ck)
    trainer.apply_ema()
    dest = Path(out_dir) if out_dir else ck / "export"
    return export_student(teacher, recipe.export_net(), recipe.inference(), dest, cfg.recipe,
                          teacher_reference(cfg.teacher.pretrained), {"train_steps": trainer.step})


def main() -> None:  # scripts/distill.py
    import sys

    from fewstep.cli import guarded

    guarded(lambda: run(sys.argv[1:]))
