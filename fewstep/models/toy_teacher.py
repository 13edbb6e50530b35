"""Build and train the embedded `toy-digits` teacher: a real Diffusers `StableDiffusionPipeline` on sklearn digits.

16x16x3 images -> AutoencoderKL (8x8x4 latents) -> UNet2DConditionModel (epsilon, linear DDPM betas) conditioned
on a frozen, randomly initialised 2-layer CLIP text encoder fed by a hand-written 56-token tokenizer
(`toy_tokenizer`). See docs/toy-teacher.md for the reference configuration and its traps.

Differences from that reference: the VAE's KL weight is 1e-2 per latent element (vs 1e-4), which gives centred,
evenly scaled latents (scaling_factor ~1.03) at a sampled-reconstruction MSE of 0.004; the UNet's eps loss then
plateaus near 0.21 rather than 0.05 because the posterior noise (std ~0.56 in scaled units) is unpredictable at
small t. The EMA decay warms up as min(0.999, (1 + step) / (10 + step)) so the random init does not linger.

Regenerate (seeded; `--threads 1` because two OpenMP threads sharing two busy cores ran ~5x slower):
    python scripts/train_toy_teacher.py --out fewstep/assets/toy-digits --grid docs/img/toy-digits-grid.png \
        --seed 0 --vae-steps 400 --unet-steps 2900 --batch-size 128 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewstep.data.digits import (class_balanced_prompts, classify_nearest_mean, digit_class_means,
                                 digit_prompt, load_digit_images)
from fewstep.models.toy_tokenizer import MAX_LENGTH, build_tokenizer

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=56, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=16, sample_size=16)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
DDPM_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon",
    clip_sample=False)
EMPTY = 10  # row of the prompt table holding the "" embedding (classifier-free guidance)


def _seeded(seed: int | None, fn: Any) -> Any:
    """Run `fn()` under `torch.manual_seed(seed)` without disturbing the caller's RNG state."""
    if seed is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build_text_encoder(seed: int = 0) -> nn.Module:
    """The frozen CLIPTextModel (72 k parameters) at a seeded random init, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    enc = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))
    return enc.eval().requires_grad_(False)


def build_vae(seed: int | None = None, **overrides: Any) -> nn.Module:
    """An untrained AutoencoderKL 16x16x3 -> 8x8x4 (658 k parameters with the default config)."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(**{**VAE_CONFIG, **overrides}))


def build_unet(seed: int | None = None, **overrides: Any) -> nn.Module:
    """An untrained UNet2DConditionModel on 8x8x4 latents (1.0 M parameters with the default config)."""
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(**{**UNET_CONFIG, **overrides}))


@torch.no_grad()
def encode_text(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str]) -> Tensor:
    """Prompt embeddings [N, 16, 64] computed exactly as `StableDiffusionPipeline.encode_prompt` does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


def prompt_table(tokenizer: Any, text_encoder: nn.Module) -> Tensor:
    """Embeddings of the ten digit prompts (rows 0..9) and of "" (row `EMPTY`): [11, 16, 64]."""
    return encode_text(tokenizer, text_encoder, [digit_prompt(d) for d in range(10)] + [""])


def warmup_cosine(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine from 1 down to `final` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(params: Any, lr: float, steps: int, warmup: int) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
    return opt, sched


def train_vae(vae: nn.Module, images: Tensor, steps: int, batch_size: int = 128, lr: float = 1e-3,
              kl_weight: float = 1e-3, warmup: int = 20, seed: int = 0, progress: bool = True) -> list[float]:
    """Train `vae` in place on `images` ([N, 3, H, W] in [-1, 1]) with MSE + `kl_weight` * KL, both averaged
    per element (pixel / latent element), decoding sampled latents. Returns the per-step total losses."""
    gen = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(vae.parameters(), lr, steps, warmup)
    vae.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for _ in bar:
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse, kl = F.mse_loss(rec, x), post.kl().mean() / post.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_posteriors(vae: nn.Module, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Posterior mean and std ([N, 4, 8, 8] each, unscaled) of every image, stored once for UNet training."""
    means, stds = [], []
    for chunk in images.split(batch_size):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: Tensor, std: Tensor, seed: int = 0) -> float:
    """1 / std of latents sampled from the stored posteriors (diffusers SD applies no shift)."""
    gen = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / z.std())


@torch.no_grad()
def vae_report(vae: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, sf: float) -> str:
    """One line of VAE diagnostics: reconstruction MSE (posterior mean / sampled), nearest-class-mean accuracy
    of sampled reconstructions, and per-channel mean/std of the scaled latents."""
    gen = torch.Generator().manual_seed(0)
    rec_mean = torch.cat([vae.decode(m).sample for m in mean.split(512)])
    z = mean + std * torch.randn(mean.shape, generator=gen)
    rec_samp = torch.cat([vae.decode(m).sample for m in z.split(512)])
    acc = (classify_nearest_mean(rec_samp, digit_class_means(images.shape[-1])) == labels).float().mean()
    zs = z * sf
    return (f"recon mse {F.mse_loss(rec_mean, images):.4f} (mean) {F.mse_loss(rec_samp, images):.4f} (sampled), "
            f"class acc {acc:.3f}, latent channel means {zs.mean((0, 2, 3)).numpy().round(2).tolist()} "
            f"stds {zs.std((0, 2, 3)).numpy().round(2).tolist()}")


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def latent_batch(mean: Tensor, std: Tensor, labels: Tensor, scaling_factor: float, batch_size: int,
                 p_uncond: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A training batch for a denoiser: latents sampled from stored VAE posteriors (`mean`, `std`, scaled by
    `scaling_factor`) and their prompt-table rows, a fraction `p_uncond` replaced by the "" row (`EMPTY`) for CFG."""
    idx = torch.randint(len(mean), (batch_size,), generator=generator)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling_factor
    cond = torch.where(torch.rand(batch_size, generator=generator) < p_uncond, EMPTY, labels[idx])
    return z0, cond


def train_with_ema(net: nn.Module, batch_loss: Callable[[], Tensor], steps: int, lr: float, warmup: int,
                   ema_decay: float, desc: str, progress: bool = True) -> tuple[nn.Module, list[float]]:
    """The toy teachers' training loop: `steps` AdamW updates of `net` on `batch_loss()` (which draws its own batch),
    warm-up + cosine to 0.1x, grad clip 1.0, and an EMA copy whose decay warms up as min(ema_decay, (1+s)/(10+s)).
    Returns (the EMA copy, the per-step losses); `net` is left trained, in eval mode."""
    opt, sched = _optimizer(net.parameters(), lr, steps, warmup)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    net.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, net, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    net.eval()
    return ema, losses


def train_unet(unet: nn.Module, mean: Tensor, std: Tensor, labels: Tensor, table: Tensor, scaling_factor: float,
               steps: int, batch_size: int = 128, lr: float = 1e-3, warmup: int = 100, ema_decay: float = 0.999,
               p_uncond: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Train `unet` in place with epsilon MSE (Ho et al. 2020, Eq. 14) on `latent_batch` draws, conditioned on
    `table[row]`. Returns `train_with_ema`'s (EMA copy of the UNet, losses)."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**DDPM_CONFIG)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> Tensor:
        z0, cond = latent_batch(mean, std, labels, scaling_factor, batch_size, p_uncond, gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        pred = unet(noise_sched.add_noise(z0, eps, t), t, encoder_hidden_states=table[cond]).sample
        return F.mse_loss(pred, eps)

    return train_with_ema(unet, batch_loss, steps, lr, warmup, ema_decay, "unet", progress)


def build_scheduler() -> Any:
    """DDIM on the training DDPM betas, trailing spacing (so few-step sampling starts at t=999)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DDPM_CONFIG, timestep_spacing="trailing", set_alpha_to_one=True)


def build_pipeline(vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, unet: nn.Module) -> Any:
    """Assemble the stock StableDiffusionPipeline (no safety checker) with the toy DDIM scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe: Any, prompts: Sequence[str], steps: int = 50, guidance: float = 2.0, seed: int = 0,
                  batch_size: int = 100, **call: Any) -> Tensor:
    """Generate one image per prompt with the pipeline (`call`: further `__call__` arguments); returns float32
    [N, 3, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        imgs = pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                    generator=gen, output_type="pt", **call).images
        out.append(imgs.float() * 2 - 1)
    return torch.cat(out)


def class_accuracy(pipe: Any, n: int = 200, steps: int = 50, guidance: float = 2.0, seed: int = 0,
                   **call: Any) -> float:
    """Fraction of `n` class-balanced samples that the nearest-class-mean 8x8 classifier labels as prompted."""
    prompts = class_balanced_prompts(n)
    imgs = sample_images(pipe, prompts, steps, guidance, seed, **call)
    target = torch.arange(n) % 10
    return float((classify_nearest_mean(imgs, digit_class_means(imgs.shape[-1])) == target).float().mean())


def save_grid(images: Tensor, path: str | Path, ncol: int = 10, scale: int = 4, pad: int = 2) -> Path:
    """Save images in [-1, 1] ([N, 3, H, W]) as a PNG grid, `ncol` per row, nearest-upscaled by `scale`."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for i, img in enumerate(((images.clamp(-1, 1) + 1) / 2)):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)
    return path


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the embedded toy-digits StableDiffusionPipeline (CPU).")
    p.add_argument("--out", default="fewstep/assets/toy-digits", help="pipeline folder to write")
    p.add_argument("--grid", default=None, help="sample grid PNG (default: OUT/../toy-digits-grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--unet-steps", type=int, default=2900)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kl-weight", type=float, default=1e-2, help="per-element KL weight (MSE is per pixel)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch default); 1 is much faster when other jobs share the CPU")
    p.add_argument("--eval-samples", type=int, default=200, help="samples for the class-accuracy check (0: skip)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train VAE then UNet, save the pipeline (safetensors) to --out, write the sample grid, print timings."""
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_digit_images(16)
    t0 = time.perf_counter()
    vae = build_vae(seed=args.seed)
    vae_losses = train_vae(vae, images, args.vae_steps, args.batch_size, kl_weight=args.kl_weight, seed=args.seed)
    mean, std = encode_posteriors(vae, images)
    sf = latent_scaling_factor(mean, std, args.seed)
    vae.register_to_config(scaling_factor=sf)
    t1 = time.perf_counter()
    print(f"vae: {vae_report(vae, images, labels, mean, std, sf)}", flush=True)
    tokenizer, text_encoder = build_tokenizer(), build_text_encoder(args.seed)
    table = prompt_table(tokenizer, text_encoder)
    unet = build_unet(seed=args.seed)
    ema, unet_losses = train_unet(unet, mean, std, labels, table, sf, args.unet_steps, args.batch_size,
                                  seed=args.seed)
    t2 = time.perf_counter()
    pipe = build_pipeline(vae, text_encoder, tokenizer, ema)
    pipe.save_pretrained(args.out, safe_serialization=True)
    grid = sample_images(pipe, [digit_prompt(i // 10) for i in range(100)], 50, 2.0, args.seed)
    grid_path = save_grid(grid, args.grid or Path(args.out).parent / "toy-digits-grid.png")
    t3 = time.perf_counter()
    acc = class_accuracy(pipe, args.eval_samples, 50, 2.0, args.seed + 1) if args.eval_samples else float("nan")
    t4 = time.perf_counter()
    tail = lambda xs: sum(xs[-50:]) / max(1, len(xs[-50:]))  # noqa: E731
    print(f"vae: {args.vae_steps} steps in {t1 - t0:.0f} s, final loss {tail(vae_losses):.5f}, scaling_factor {sf:.4f}")
    print(f"unet: {args.unet_steps} steps in {t2 - t1:.0f} s, final loss {tail(unet_losses):.5f}")
    print(f"save + grid: {t3 - t2:.0f} s -> {args.out}, {grid_path}")
    print(f"class accuracy (nearest class mean, {args.eval_samples} samples, DDIM 50, guidance 2.0): {acc:.3f} "
          f"in {t4 - t3:.0f} s; total {t4 - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
