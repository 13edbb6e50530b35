"""The reference-statistics store of `fewstep eval`: what a reference is (descriptor), its manifest, and where it lives.

A reference is described by a JSON-able descriptor (real digits, an image folder, or teacher samples with the
teacher's weights hash, steps, sampler, guidance, resolution, seeds and prompts hash). Its manifest is
`fewstep.metrics.fid.manifest_for` (extractor id and weights hash, preprocessing, library versions) plus that
descriptor and the crop/resize policy; the statistics are stored once as `<stem>.npz` + `<stem>.json` under the
store root and refused when a later run's manifest differs (`check_compatible`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.eval.scoring import CROP_POLICY, FidMetric, extractor_name, make_extractor, prepare, slug
from fewstep.metrics.features import FeatureExtractor, file_sha256
from fewstep.metrics.fid import (FeatureStats, Reference, check_compatible, extract_stats, hash_items, load_reference,
                                 manifest_for, save_reference)
from fewstep.recipes.base import InferenceSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def list_images(folder: str | Path) -> list[Path]:
    """The PNG/JPEG files directly in `folder`, sorted by name; FewstepError when there are none."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if root.is_dir() else []
    if not files:
        raise FewstepError(f"no PNG/JPEG images in {root}: point the reference folder at the image files")
    return files


def folder_batches(files: Sequence[Path], eval_res: int | None, batch_size: int = 64) -> Iterator[Tensor]:
    """uint8 [B, 3, H, W] batches of image files (RGB), cropped/resized to `eval_res` (then they may differ)."""
    from PIL import Image

    for i in range(0, len(files), batch_size):
        batch = []
        for p in files[i:i + batch_size]:
            with Image.open(p) as im:
                x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None]
            batch.append(prepare(x, eval_res))
        yield torch.cat(batch)


# --- store --------------------------------------------------------------------------------------------

def stats_root(stats_dir: str | None) -> Path:
    """The reference-statistics store: the protocol's stats_dir, else $FEWSTEP_STATS_DIR, else ~/.cache."""
    return Path(stats_dir or os.environ.get("FEWSTEP_STATS_DIR") or "~/.cache/fewstep/stats").expanduser()


def teacher_identity(teacher: Any) -> dict[str, Any]:
    """Name and weights hash of a teacher: sha256 over its denoiser's weight files (or its hub id)."""
    from fewstep.models.teacher import resolve_pretrained

    src = resolve_pretrained(teacher.name)
    folder = Path(src) / teacher.family.net_attr
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    digest = hash_items(f"{p.relative_to(folder)}\t{file_sha256(p)}" for p in files) if files else None
    return {"teacher": teacher.name, "weights_sha256": digest or f"unhashed:{src}"}


def digits_descriptor() -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """(descriptor, batches(accelerator)) of the real reference: all 1797 sklearn digits, uint8 16x16
    (this process's shard)."""
    from fewstep.metrics.digits import reference_digits

    images, _ = reference_digits(16)
    desc = {"kind": "digits", "source": "sklearn.datasets.load_digits", "n": int(len(images)),
            "pixels_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    return desc, lambda acc: [images[acc.process_index::acc.num_processes, None]]


def folder_descriptor(folder: str, eval_res: int | None) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """(descriptor, batches(accelerator)) of a reference image folder (this process's shard of the sorted files);
    the hash covers file names and sizes."""
    files = list_images(folder)
    desc = {"kind": "folder", "folder": str(Path(folder).resolve()), "n": len(files),
            "files_sha256": hash_items(f"{p.name}\t{p.stat().st_size}" for p in files)}
    return desc, lambda acc: folder_batches(files[acc.process_index::acc.num_processes], eval_res)


def reference_manifest(extractor: FeatureExtractor, protocol: str, descriptor: dict[str, Any],
                       eval_res: int | None) -> dict[str, Any]:
    """`manifest_for` plus the reference descriptor and the image crop/resize policy."""
    ref_hash = hash_items([json.dumps(descriptor, sort_keys=True)])
    images = {**CROP_POLICY, "eval_res": eval_res} if eval_res else {"crop": "none", "resize": "none"}
    return {**manifest_for(extractor, protocol, ref_hash), "reference": descriptor, "images": images}


def reference_stem(root: Path, manifest: dict[str, Any]) -> Path:
    key = hash_items([manifest["reference_sha256"], manifest["extractor"], json.dumps(manifest["images"])])
    return root / slug(manifest["protocol"]) / f"{slug(manifest['extractor'])}-{key[:16]}"


def stored_reference(root: Path | None, manifest: dict[str, Any], build: Callable[[], FeatureStats],
                     accelerator: Any, memo: dict[str, tuple[Reference, str]] | None = None,
                     save: bool = True) -> tuple[Reference, str]:
    """The reference for `manifest`: loaded from the store (manifest checked), else built (collectively) and saved
    by the main process when `save`. `root=None`: no store. `memo` caches references in this process.
    Returns (reference, where it came from)."""
    stem = reference_stem(root or Path("."), manifest)
    if memo is not None and str(stem) in memo:
        return memo[str(stem)]
    if root is not None and stem.with_suffix(".json").is_file():
        ref = load_reference(stem)
        try:
            check_compatible(ref.manifest, manifest)
        except FewstepError as exc:
            raise FewstepError(f"stored reference {stem}.json does not match this run ({exc}); delete "
                               f"{stem}.npz/.json to recompute it") from None
        where = f"{stem}.npz (reused)"
    else:
        stats = build()
        full = {**manifest, "n": stats.n}
        save = save and root is not None
        if save and accelerator.is_main_process:
            save_reference(stem, stats, full)
        accelerator.wait_for_everyone()
        mu, sigma = stats.mean_cov()
        feats = stats.features.numpy() if stats.kept else None
        ref = Reference(mu=mu, sigma=sigma, n=stats.n, features=feats, manifest=full)
        where = f"{stem}.npz (computed)" if save else "computed in memory"
    if memo is not None:
        memo[str(stem)] = (ref, where)
    return ref, where


def _load_teacher(name: str, device: str) -> Any:
    from fewstep.models.teacher import load_teacher

    return load_teacher(name, device=device)


# --- a row's FID reference ---------------------------------------------------------------------------------

def reference_teacher(ctx: Any, target: Any) -> Any:
    """The frozen teacher behind a row, loaded once (the row's own bundle when it is that teacher)."""
    name = target.teacher_name
    if name not in ctx.teachers:
        ctx.teachers[name] = target.teacher if target.kind == "teacher" and target.model == name else \
            _load_teacher(name, ctx.device)
        ctx.teachers[name].autocast_dtype = target.teacher.autocast_dtype
    return ctx.teachers[name]


def fid_metric(ctx: Any, target: Any, generate: Callable[..., float],
               extractor: str | None = None) -> tuple[FidMetric, dict[str, Any]]:
    """The FID accumulator of a row (`fewstep.eval.run.Target` in a `Context`) with its reference (stored, reused
    or built: teacher samples through `generate`, real digits, or a folder sharded over the processes) and the
    reference record {"where", "manifest"} for the report. `extractor`: one of `fid.extra_extractors` instead of
    `fid.extractor` (same reference, its own statistics and manifest)."""
    f = ctx.proto.fid
    ext_name = extractor_name(f.extractor if extractor is None else extractor, target.teacher_name)
    if ext_name not in ctx.extractors:
        ctx.extractors[ext_name] = make_extractor(ext_name, f.weights, f.clip_model, ctx.device)
    ext = ctx.extractors[ext_name]
    keep = f.kid_keep if f.kid else 0
    name = f"{'fid_vs_teacher' if f.reference == 'teacher' else 'fid'}[{ext.id}]"
    if f.reference == "teacher":
        teacher = reference_teacher(ctx, target)
        guidance = target.spec.guidance_scale if f.teacher_guidance is None else f.teacher_guidance
        tspec = InferenceSpec([float(t) for t in teacher.teacher_times(f.teacher_steps)], "ddim", guidance)
        desc = {"kind": "teacher", **teacher_identity(teacher), "steps": f.teacher_steps, "sampler": "ddim",
                "guidance": guidance, "resolution": teacher.size, "n": len(ctx.prompts),
                "seeds": [ctx.seed, ctx.seed + len(ctx.prompts) - 1], "prompts_sha256": hash_items(ctx.prompts)}

        def build() -> Any:
            sink = FidMetric(name, ext, None, f.eval_res, f.kid_subset_size if f.kid else None, keep)
            idx = ctx.shard(len(ctx.prompts))
            with ctx.bar(len(idx), f"reference: {teacher.name} {f.teacher_steps} steps") as bar:
                generate(teacher, teacher.denoiser(), teacher.net, tspec, ctx.prompts, ctx.seed, idx,
                         ctx.opts.batch_size, [sink], bar)
            return sink.gathered(ctx.acc)
    else:
        desc, batches = (digits_descriptor() if f.reference == "digits"
                         else folder_descriptor(f.reference_folder, f.eval_res))

        def build() -> Any:  # real images: each process its shard, then the sums are combined
            stats = extract_stats(ext, (prepare(b, f.eval_res) for b in batches(ctx.acc)), keep=keep)
            return FidMetric(name, ext, stats=stats).gathered(ctx.acc)
    manifest = reference_manifest(ext, ctx.proto.name, desc, f.eval_res)
    ref, where = stored_reference(ctx.store, manifest, build, ctx.acc, ctx.memo, ctx.save_refs)
    metric = FidMetric(name, ext, ref, f.eval_res, f.kid_subset_size if f.kid else None, keep)
    return metric, {"where": where, "manifest": ref.manifest}
