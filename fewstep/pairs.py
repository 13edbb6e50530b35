"""Teacher noise -> image pairs for DMD's regression loss (Yin et al. 2024, §3.3): the teacher's deterministic
multi-step sampler run once from stored noise, cached as safetensors next to the prompts that made them.

    fewstep pairs toy-digits --out pairs/toy --num 2000 --steps 50 --guidance 2
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fewstep.cli_args import pick_device
from fewstep.errors import FewstepError
from fewstep.paths import staged_output
from fewstep.models.teacher import Teacher
from fewstep.sampling.engine import seed_generators
from fewstep.sampling.generate import generate_latents

PAIRS_FILE, PROMPTS_FILE = "pairs.safetensors", "prompts.json"


@torch.no_grad()
def build_pairs(teacher: Teacher, prompts: list[str], seeds: list[int], steps: int, guidance: float, out: Path,
                batch_size: int = 64) -> Path:
    """Write noise [N, C, H, W], target [N, C, H, W] (model latents) and the prompts into `out`, through a
    temporary folder renamed into place, so an interrupted build never leaves a half cache."""
    from fewstep.sampling.steps import randn

    times = teacher.teacher_times(steps)
    noise_fn = getattr(teacher.family, "draw_noise", randn)
    device = next(teacher.net.parameters()).device
    noises, targets = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="teacher pairs"):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        z = noise_fn((len(p), *teacher.latent_shape()), seed_generators(s), device, torch.float32)
        noises.append(z.cpu())
        targets.append(generate_latents(teacher, teacher.denoiser(), teacher.net, p, s, times, "ddim", guidance,
                                        noise=z).cpu())
    with staged_output(out) as tmp:
        save_file({"noise": torch.cat(noises).contiguous(), "target": torch.cat(targets).contiguous()},
                  str(tmp / PAIRS_FILE), metadata={"steps": str(steps), "guidance": str(guidance), "teacher": teacher.name})
        (tmp / PROMPTS_FILE).write_text(json.dumps(prompts))
    return out / PAIRS_FILE


def load_pairs(path: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    folder = Path(path)
    if not (folder / PAIRS_FILE).is_file() or not (folder / PROMPTS_FILE).is_file():
        raise FewstepError(f"{path} holds no teacher pairs; build them with "
                           f"`fewstep pairs <teacher> --out {path} --num 2000`")
    try:
        data = load_file(str(folder / PAIRS_FILE))
        prompts = json.loads((folder / PROMPTS_FILE).read_text())
    except Exception as exc:
        raise FewstepError(f"teacher pairs in {path} are corrupt ({type(exc).__name__}); rebuild them") from exc
    if len(prompts) != len(data["noise"]):
        raise FewstepError(f"{path}: {len(prompts)} prompts but {len(data['noise'])} pairs; rebuild the cache")
    return data["noise"], data["target"], prompts


def run_pairs(args: Any) -> Path:
    from fewstep.models.teacher import load_teacher
    from fewstep.sample import choose_prompts

    device = pick_device(args.device)
    teacher = load_teacher(args.model, device=device)
    prompts = choose_prompts(args.prompts, args.num, args.model)
    path = build_pairs(teacher, prompts, [args.seed + i for i in range(args.num)], args.steps, args.guidance,
                       Path(args.out), args.batch_size)
    print(f"wrote {args.num} teacher pairs to {path}")
    return path
