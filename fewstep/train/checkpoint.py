"""Atomic checkpoints holding the full training state: trainables, recipe extra state, EMA, optimizers,
LR schedulers, RNG, the logging window and step. Tensors go through safetensors; optimizer/RNG state through
torch.save and is read back with `torch.load(weights_only=True)` only.

A checkpoint is written into a temporary sibling folder and renamed into place (`paths.staged_output`), so a kill
mid-save leaves the previous checkpoints intact and `resume=latest` never sees a half-written one. Its state.json
lists every file with its size, so a truncated or damaged newest checkpoint is found before any model loads, and
the error names the previous good one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError
from fewstep.paths import STATE_FILE, latest, list_checkpoints, resolve_resume, staged_output, step_dir  # noqa: F401

FAULT_ENV = "FEWSTEP_FAULT"   # tests only: "<point>@<step>" kills the process there (see `fault_point`)


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process at `point` of `step` when FEWSTEP_FAULT says so: how the crash tests interrupt a run
    mid-step or mid-save at an exact place."""
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _contiguous(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


def remove_stale(root: Path) -> None:
    """Temporary folders a killed save left behind (one writer per run: the main process)."""
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], blobs: dict[str, Any],
                    meta: dict[str, Any], keep: int = 0, shards: Callable[[Path], None] | None = None) -> Path:
    """tensors: file stem -> flat tensor dict (safetensors); blobs: file stem -> picklable-by-weights_only object;
    shards: writes the sharded part into the staging folder (every process at once: `fewstep.train.shards`).
    A failed write (a full disk) raises one FewstepError and leaves every earlier checkpoint as it was."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    final = step_dir(root, step)
    try:
        with staged_output(final) as tmp:
            for stem, d in tensors.items():
                save_file(_contiguous(d), str(tmp / f"{stem}.safetensors"))
            for stem, obj in blobs.items():
                torch.save(obj, tmp / f"{stem}.pt")
            if shards is not None:
                shards(tmp)
            fault_point("save", step)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step, "files": files}, indent=2, sort_keys=True))
    except FewstepError as exc:
        newest = latest(root)
        kept = f"the newest complete checkpoint is still {newest}" if newest else "no earlier checkpoint exists"
        raise FewstepError(f"checkpoint step {step} was not saved: {exc}; {kept} (resume=latest continues from it)"
                           ) from exc
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def damaged(path: Path, reason: str) -> FewstepError:
    """One line for a checkpoint that cannot be used, naming the previous complete one and how to resume it."""
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    fix = (f"resume from the previous one with resume={older[-1]} (or delete {path} and use resume=latest)"
           if older else "no earlier checkpoint exists: start a new output_dir")
    return FewstepError(f"checkpoint {path} is damaged ({reason}); {fix}")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Cheap completeness check before any model loads: state.json parses and every file it lists is there with
    its recorded size (a truncated copy or a half-synced disk fails here). Returns state.json."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise damaged(path, f"{STATE_FILE} unreadable: {exc}") from exc
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise damaged(path, f"{name} is missing")
        if f.stat().st_size != size:
            raise damaged(path, f"{name} has {f.stat().st_size} bytes, {size} were written")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensor files by stem, blobs by stem, state.json). Any damage -> one FewstepError naming the fix."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FewstepError(f"{path} is not a complete checkpoint (no {STATE_FILE}); resume from another one or "
                           "start a new run")
    meta = verify_checkpoint(path)
    try:
        tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        blobs = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(path.glob("*.pt"))}
    except Exception as exc:  # safetensors / pickle / json errors all mean the same to the user
        raise damaged(path, f"corrupt: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return tensors, blobs, meta
