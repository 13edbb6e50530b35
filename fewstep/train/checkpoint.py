"""Atomic checkpoints holding the full training state: trainables, recipe extra state, EMA, optimizers,
LR schedulers, RNG and step. Tensors go through safetensors; optimizer/RNG state through torch.save and is read
back with `torch.load(weights_only=True)` only.

A checkpoint is written into a temporary sibling folder and renamed into place, so a kill mid-save leaves the
previous checkpoints intact and `resume=latest` never sees a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError
from fewstep.paths import STATE_FILE, latest, list_checkpoints, resolve_resume, step_dir  # noqa: F401

def _contiguous(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], blobs: dict[str, Any],
                    meta: dict[str, Any], keep: int = 0) -> Path:
    """tensors: file stem -> flat tensor dict (safetensors); blobs: file stem -> picklable-by-weights_only object."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, d in tensors.items():
        save_file(_contiguous(d), str(tmp / f"{stem}.safetensors"))
    for stem, obj in blobs.items():
        torch.save(obj, tmp / f"{stem}.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    if final.exists():  # re-saving the same step: swap, then drop the old copy
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensor files by stem, blobs by stem, state.json). Any damage -> one FewstepError naming the fix."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FewstepError(f"{path} is not a complete checkpoint (no {STATE_FILE}); resume from another one or "
                           "start a new run")
    try:
        meta = json.loads(state_file.read_text())
        tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        blobs = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(path.glob("*.pt"))}
    except Exception as exc:  # safetensors / pickle / json errors all mean the same to the user
        raise FewstepError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                           "delete it and resume from an earlier checkpoint") from exc
    return tensors, blobs, meta
