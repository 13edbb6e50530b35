"""`fewstep sample MODEL --out DIR`: images 00000.png ... plus metadata.jsonl, through the sampling engine."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.data.datasets import read_prompts
from fewstep.errors import FewstepError
from fewstep import paths
from fewstep.cli_args import pick_device
from fewstep.export import load_export
from fewstep.models.attention import set_attention_backend
from fewstep.models.teacher import Teacher, load_teacher
from fewstep.recipes.base import InferenceSpec
from fewstep.sampling.generate import generate_latents

GRAYSCALE_TEACHERS = {"toy-digits", "toy-digits-sd3"}  # single-channel data stored as 3 identical channels
TEACHER_DEFAULT_STEPS = 50


def resolve_model(model: str, steps: int | None, guidance: float | None, device: str) -> tuple[Teacher, InferenceSpec, str]:
    """(teacher bundle carrying the network to sample, sampler spec, teacher name)."""
    if paths.model_kind(model) == "export":
        teacher, spec, meta = load_export(Path(model), device)
        if steps is not None and steps != len(spec.times) - 1:
            spec.times = [float(t) for t in teacher.student_times(steps)]
        if guidance is not None:
            spec.guidance_scale = guidance
        return teacher, spec, str(meta["teacher"])
    teacher = load_teacher(model, device=device)
    n = TEACHER_DEFAULT_STEPS if steps is None else steps
    spec = InferenceSpec(times=[float(t) for t in teacher.teacher_times(n)], step="ddim",
                         guidance_scale=1.0 if guidance is None else guidance)
    return teacher, spec, model


def choose_prompts(path: str | None, n: int, teacher_name: str) -> list[str]:
    if path:
        prompts = read_prompts(path)
        return [prompts[i % len(prompts)] for i in range(n)]
    if teacher_name in GRAYSCALE_TEACHERS:
        from fewstep.data.digits import class_balanced_prompts

        return class_balanced_prompts(n)
    raise FewstepError("--prompts is required for this model (a text file with one prompt per line)")


def to_pil(image: torch.Tensor, gray: bool) -> Any:
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if gray:
        return Image.fromarray(arr.float().mean(0).round().to(torch.uint8).numpy(), mode="L")
    return Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).numpy()))


def precision_dtype(precision: str, device: str) -> torch.dtype | None:
    """bf16 autocast only where CUDA runs the model; fp32 elsewhere."""
    if precision == "bf16" and not device.startswith("cuda"):
        raise FewstepError("--precision bf16 needs a CUDA device; use --precision fp32 (or auto) on CPU")
    if precision == "bf16" or (precision == "auto" and device.startswith("cuda")):
        return torch.bfloat16
    return None


def run_sample(args: Any) -> Path:
    """Images and metadata.jsonl into `--out`, written into a temporary folder and moved into place when all are
    done, so an interrupted or failed run leaves `--out` as it was."""
    out = paths.claim_output(args.out, "--out", getattr(args, "overwrite", False))
    device = pick_device(args.device)
    teacher, spec, name = resolve_model(args.model, args.steps, args.guidance, device)
    teacher.autocast_dtype = precision_dtype(args.precision, device)
    nets = spec.networks(teacher.net)
    denoiser = spec.wrap(teacher.denoiser())
    if args.compile:
        for net in nets:
            net.compile()
    prompts = choose_prompts(args.prompts, args.num_images, name)
    seeds = [args.seed + i for i in range(args.num_images)]
    times = torch.tensor(spec.times, dtype=torch.float64)
    rows = []
    with ExitStack() as stack:
        tmp = stack.enter_context(paths.staged_output(out))
        for net in nets:
            stack.enter_context(set_attention_backend(net, args.attention))
        for i in tqdm(range(0, len(prompts), args.batch_size), desc="sampling"):
            sl = slice(i, i + args.batch_size)
            lat = generate_latents(teacher, denoiser, teacher.net, prompts[sl], seeds[sl], times, spec.step,
                                   spec.guidance_scale)
            for j, img in enumerate(teacher.decode(lat).cpu()):
                k = i + j
                to_pil(img, name in GRAYSCALE_TEACHERS).save(tmp / f"{k:05d}.png")
                rows.append({"file": f"{k:05d}.png", "prompt": prompts[k], "seed": seeds[k],
                             "steps": len(spec.times) - 1, "guidance": spec.guidance_scale})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images to {out}")
    return out
