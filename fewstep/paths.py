"""Every path a command reads or writes, checked before any model loads (this module imports no torch).

Inputs: teacher specs (a preset, a Diffusers pipeline folder or a hub id), the models `sample`, `eval` and `bench`
take (those, or a fewstep export folder), prompt files. Outputs: one policy for every command. A folder that
exists and is not empty is never reused or emptied unless the user passes the command's overwrite flag, and
results are written into a temporary sibling that is renamed into place only when complete, so a failed or
interrupted command leaves the destination as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fewstep.errors import FewstepError

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = {"toy-digits": ASSETS / "toy-digits", "toy-digits-sd3": ASSETS / "toy-digits-sd3"}
SIDECAR = "fewstep.json"
PIPELINE_INDEX = "model_index.json"
EXPORT_MARK = "_fewstep_export"   # written into a full export's model_index.json (stock loaders ignore "_" keys)
CALL_DEFAULTS_KEY = "_fewstep_call_defaults"   # model_index.json: `__call__` arguments the teacher was trained with


ACCEPTS = {"teacher": f"an existing Diffusers pipeline folder or a preset ({', '.join(BUILTIN)})",
           "model": f"a preset ({', '.join(BUILTIN)}), a Diffusers pipeline folder or a fewstep export folder"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_pretrained(spec: str, role: str = "teacher") -> str:
    """A builtin name, a local pipeline folder, a LoRA export (loaded as its teacher with the adapter fused), or a
    hub id (refused while offline, with the fix)."""
    if spec in BUILTIN:
        path = BUILTIN[spec]
        if not (path / PIPELINE_INDEX).is_file():
            script = "train_toy_teacher_sd3.py" if spec.endswith("-sd3") else "train_toy_teacher.py"
            raise FewstepError(f"builtin teacher {spec!r} is missing at {path}; regenerate it with "
                               f"`python scripts/{script}`")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        meta = read_sidecar(path) if not (path / PIPELINE_INDEX).is_file() else None
        if meta is not None and meta.get("lora") and not meta.get("experts"):
            resolve_pretrained(str(meta["teacher"]), role)   # a LoRA export: its base teacher must resolve too
            return str(path)
        if not (path / PIPELINE_INDEX).is_file():
            raise FewstepError(f"{role} {spec} is not a Diffusers pipeline folder (no {PIPELINE_INDEX}){_hint(path)}")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FewstepError(f"{role} path {spec!r} does not exist; pass {ACCEPTS.get(role, ACCEPTS['teacher'])}")
    if hub_offline():
        raise FewstepError(f"{role} {spec!r} looks like a hub id but HF_HUB_OFFLINE=1; download it first "
                           f"(`huggingface-cli download {spec}`) and pass the local folder, or unset HF_HUB_OFFLINE")
    return spec


def _hint(path: Path) -> str:
    """Where a folder that is not a pipeline points at one: a run folder's export, an export's parent."""
    if (path / "export" / SIDECAR).is_file():
        return f"; did you mean its export, {path / 'export'}?"
    if (path / "config.yaml").is_file():
        return f"; it looks like a run folder without an export yet (`fewstep export {path}` writes one)"
    return "; pass a folder written by `save_pretrained`, a fewstep export folder or a preset name"


def read_sidecar(path: Path) -> dict | None:
    """An export folder's fewstep.json, or None where there is none."""
    f = Path(path) / SIDECAR
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FewstepError(f"{f} is not valid JSON ({exc}); re-export with `fewstep export <checkpoint>`") from exc
    if not isinstance(meta, dict) or "times" not in meta:
        raise FewstepError(f"{f} is not a fewstep export sidecar (no 'times'); re-export with `fewstep export`")
    return meta


def model_kind(spec: str) -> str:
    """What `sample`, `eval` and `bench` were given: "export" (a folder with fewstep.json) or "teacher" (a preset,
    a pipeline folder or a hub id). Anything else is one FewstepError naming what to pass instead."""
    path = Path(spec).expanduser()
    if path.is_dir() and read_sidecar(path) is not None:
        return "export"
    if path.is_dir() and _marked_export(path):
        raise FewstepError(f"{spec} is a fewstep export whose {SIDECAR} is missing, so its sampler (timesteps, "
                           "guidance) is unknown; re-export it with `fewstep export <checkpoint> --out ...`")
    resolve_pretrained(spec, role="model")
    return "teacher"


def _marked_export(path: Path) -> bool:
    index = path / PIPELINE_INDEX
    try:
        return index.is_file() and EXPORT_MARK in json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_prompt_file(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise FewstepError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FewstepError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise FewstepError(f"prompt file {path} is empty; put one prompt per line")
    return prompts


def claim_output(path: str | Path, flag: str = "--out", overwrite: bool = False) -> Path:
    """Check a destination folder before any work: not a file, and empty or absent unless `overwrite`."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FewstepError(f"{flag} {out} is a file, not a folder; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        fix = "pass a new folder, or --overwrite to replace it" if flag.startswith("--") else "pass a new folder"
        raise FewstepError(f"{flag} {out} already exists and is not empty; {fix}")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise FewstepError(f"{flag} {out}: cannot write under {parent}; pass a writable folder")
    return out


@contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; on success it replaces `path` (an older folder there is
    removed only after the new one is in place), on any error it is deleted and `path` is left as it was."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:   # a full disk, a lost mount: nothing half-written is left, and the destination is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise FewstepError(f"could not write {out} ({exc.strerror or exc}); {out} and everything beside it are left "
                           "as they were; free some space (or fix the folder) and run the command again") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# -- checkpoints (written by fewstep.train.checkpoint) -------------------------------------------------------------
STATE_FILE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first; temporary folders are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was saved at (its state.json)."""
    try:
        return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError) as exc:
        raise FewstepError(f"checkpoint {path} has a damaged {STATE_FILE} ({exc}); use an earlier checkpoint") from exc


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
    """resume= '' (fresh run), 'latest' (newest checkpoint under output_dir, or None if there is none), or the path
    of a complete checkpoint folder."""
    if not spec:
        return None
    if spec == "latest":
        return latest(output_dir / "checkpoints")
    path = Path(spec)
    example = output_dir / "checkpoints" / "step-0001000"
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FewstepError(f"resume={spec} {what}; pass resume=latest or a checkpoint folder such as {example}")
    if not (path / STATE_FILE).is_file():
        raise FewstepError(f"resume={spec} is not a complete checkpoint (no {STATE_FILE}); pass resume=latest or a "
                           f"checkpoint folder such as {example}")
    return path
