"""Build and train the embedded `toy-digits-sd3` teacher: a stock `StableDiffusion3Pipeline` (MMDiT, rectified
flow) on sklearn digits, the flow counterpart of `toy-digits` (fewstep/models/toy_teacher.py).

Parts: the `toy-digits` VAE (16x16x3 -> 8x8x4, reused as trained, `shift_factor` 0 added because the SD3 pipeline
reads it), two frozen random-init `CLIPTextModelWithProjection`s on the toy tokenizer (different seeds; the pipeline
takes CLIP-L's and CLIP-G's penultimate hidden states and concatenates the pooled projections), no T5 (the
pipeline then fills its part of the context with zeros), an `SD3Transformer2DModel` (4 joint blocks, width 128,
patch 2: 16 image tokens) and a `FlowMatchEulerDiscreteScheduler` with static shift 3.

Context length. With the T5 slot empty the stock pipeline still appends `max_sequence_length` zero tokens (256 by
default), which made a training step about 10x slower on 2 CPU cores (1.9 s against 0.15 s at batch 128). The
toy's tokenizers pad to 8 tokens and the teacher is trained, and must be called, with `max_sequence_length=8`:
that is recorded in the folder's model_index.json under `_fewstep_call_defaults` (diffusers' loaders skip "_"
keys), fewstep passes it everywhere, and an export's fewstep.json lists it in `pipeline_kwargs` for stock calls.

Training: the rectified-flow loss of SD3 (Esser et al. 2024, Eq. 1 with the flow target u = eps - x0 that
diffusers' SD3 scripts use), logit-normal(0, 1) times (their §3.1) mapped through the scheduler's shift (Eq. 23),
10 % of prompts replaced by "" for classifier-free guidance, AdamW with warm-up + cosine, EMA weights shipped.

Regenerate (seeded; `--threads 2` alone on the 2-core VM):
    python scripts/train_toy_teacher_sd3.py --out fewstep/assets/toy-digits-sd3 --grid docs/img/toy-digits-sd3-grid.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.data.digits import digit_prompt, load_digit_images
from fewstep.diffusion.forward import diffuse
from fewstep.diffusion.schedule import RectifiedFlow, static_shift
from fewstep.models.toy_teacher import (TEXT_CONFIG, _seeded, class_accuracy, encode_posteriors, latent_batch,
                                        sample_images, save_grid, train_with_ema)
from fewstep.models.toy_tokenizer import build_tokenizer
from fewstep.paths import BUILTIN, CALL_DEFAULTS_KEY, PIPELINE_INDEX

TOKENS = 8        # CLIP padding length and the T5 zeros' length (`max_sequence_length`)
SHIFT = 3.0       # the scheduler's static shift (SD3-medium's value), used for training times and sampling
CALL_DEFAULTS = {"max_sequence_length": TOKENS}
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=2 * TEXT_CONFIG["hidden_size"], caption_projection_dim=128,
    pooled_projection_dim=2 * TEXT_CONFIG["projection_dim"], pos_embed_max_size=8)


def build_text_encoders(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Two frozen CLIPTextModelWithProjection (the toy's config, 8 positions) at seeded random inits."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{**TEXT_CONFIG, "max_position_embeddings": TOKENS})
    return tuple(_seeded(seed + k, lambda: CLIPTextModelWithProjection(cfg)).eval().requires_grad_(False)
                 for k in (1, 2))


def build_transformer(seed: int | None = None, **overrides: Any) -> nn.Module:
    """An untrained SD3Transformer2DModel on 8x8x4 latents (2.3 M parameters with the default config)."""
    from diffusers import SD3Transformer2DModel

    return _seeded(seed, lambda: SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **overrides}))


def build_scheduler(shift: float = SHIFT) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_toy_vae() -> nn.Module:
    """The `toy-digits` teacher's trained VAE, with `shift_factor` 0 (SD3's decode adds it after unscaling)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(BUILTIN["toy-digits"] / "vae"), use_safetensors=True).eval()
    vae.register_to_config(shift_factor=0.0)
    return vae.requires_grad_(False)


def build_pipeline(vae: nn.Module, text_encoders: Sequence[nn.Module], transformer: nn.Module,
                   shift: float = SHIFT) -> Any:
    """The stock StableDiffusion3Pipeline with no T5 (text_encoder_3 = tokenizer_3 = None)."""
    from diffusers import StableDiffusion3Pipeline

    te1, te2 = text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_scheduler(shift), vae=vae, text_encoder=te1,
        tokenizer=build_tokenizer(max_length=TOKENS), text_encoder_2=te2, tokenizer_2=build_tokenizer(max_length=TOKENS),
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def prompt_table(pipe: Any) -> tuple[Tensor, Tensor]:
    """The pipeline's own `encode_prompt` of the ten digit prompts (rows 0..9) and of "" (row `EMPTY`):
    context [11, 2 * TOKENS, 128] and pooled projections [11, 128], so training conditions exactly as sampling."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                           do_classifier_free_guidance=False, **CALL_DEFAULTS)
    return emb.float(), pooled.float()


def training_times(batch: int, shift: float, generator: torch.Generator) -> Tensor:
    """SD3's training noise levels: logit-normal(0, 1) (Esser et al. 2024, §3.1) through the static shift (Eq. 23),
    as diffusers' SD3 scripts draw them (there on the scheduler's 1000-level grid; here continuous)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    return static_shift(u, shift)


def flow_loss(net: nn.Module, z0: Tensor, t: Tensor, noise: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
    """Rectified-flow MSE: the transformer at x_t = (1 - t) z0 + t noise, timestep 1000 t, against u = noise - z0."""
    x_t = diffuse(z0, t, RectifiedFlow(), noise)
    pred = net(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled).sample
    return F.mse_loss(pred, noise - z0)


def train_transformer(net: nn.Module, mean: Tensor, std: Tensor, labels: Tensor, table: tuple[Tensor, Tensor],
                      scaling_factor: float, steps: int, batch_size: int = 128, lr: float = 5e-4, warmup: int = 100,
                      ema_decay: float = 0.999, p_uncond: float = 0.1, shift: float = SHIFT, seed: int = 0,
                      progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Train `net` in place with `flow_loss` on `latent_batch` draws at `training_times`, conditioned on `table`
    rows. Returns `train_with_ema`'s (the EMA copy, the per-step losses)."""
    context, pooled = table
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> Tensor:
        z0, cond = latent_batch(mean, std, labels, scaling_factor, batch_size, p_uncond, gen)
        t = training_times(batch_size, shift, gen)
        return flow_loss(net, z0, t, torch.randn(z0.shape, generator=gen), context[cond], pooled[cond])

    return train_with_ema(net, batch_loss, steps, lr, warmup, ema_decay, "transformer", progress)


def save_teacher(pipe: Any, out: str | Path) -> Path:
    """`save_pretrained` (safetensors), then the call defaults fewstep needs into model_index.json."""
    out = Path(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    index = out / PIPELINE_INDEX
    index.write_text(json.dumps({**json.loads(index.read_text()), CALL_DEFAULTS_KEY: CALL_DEFAULTS}, indent=2,
                                sort_keys=True) + "\n")
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the embedded toy-digits-sd3 StableDiffusion3Pipeline (CPU).")
    p.add_argument("--out", default="fewstep/assets/toy-digits-sd3", help="pipeline folder to write")
    p.add_argument("--grid", default=None, help="sample grid PNG (default: OUT/../toy-digits-sd3-grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--shift", type=float, default=SHIFT)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--eval-samples", type=int, default=200, help="samples for the class-accuracy check (0: skip)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the transformer on the toy VAE's latents, save the pipeline, write a 50-step sample grid."""
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_digit_images(16)
    t0 = time.perf_counter()
    vae = load_toy_vae()
    mean, std = encode_posteriors(vae, images)
    pipe = build_pipeline(vae, build_text_encoders(args.seed), build_transformer(seed=args.seed), args.shift)
    table = prompt_table(pipe)
    ema, losses = train_transformer(pipe.transformer, mean, std, labels, table, float(vae.config.scaling_factor),
                                    args.steps, args.batch_size, args.lr, shift=args.shift, seed=args.seed,
                                    progress=not args.no_progress)
    pipe.transformer = ema
    t1 = time.perf_counter()
    save_teacher(pipe, args.out)
    grid = sample_images(pipe, [digit_prompt(i // 10) for i in range(100)], 50, 2.0, args.seed, **CALL_DEFAULTS)
    grid_path = save_grid(grid, args.grid or Path(args.out).parent / "toy-digits-sd3-grid.png")
    acc = (class_accuracy(pipe, args.eval_samples, 50, 2.0, args.seed + 1, **CALL_DEFAULTS) if args.eval_samples
           else float("nan"))
    t2 = time.perf_counter()
    tail = sum(losses[-50:]) / max(1, len(losses[-50:]))
    print(f"transformer: {args.steps} steps in {t1 - t0:.0f} s, final loss {tail:.5f}")
    print(f"saved {args.out}, grid {grid_path}; class accuracy (nearest class mean, {args.eval_samples} samples, "
          f"Euler 50, guidance 2.0): {acc:.3f}; sampling {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
