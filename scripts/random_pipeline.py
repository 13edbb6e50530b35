"""Write a shape-only Diffusers pipeline folder: the real architecture of SD1.5 or SDXL, random weights.

For speed and memory work where the real weights cannot be downloaded (CI, an air-gapped GPU box): the networks
have exactly the published layer shapes, so `fewstep bench` and short training runs cost what they cost on the
real model, while the images are noise. The tokenizer is fewstep's toy CLIP BPE padded to 77 tokens (the text
encoder still runs its full 77-token sequence). Never use these folders for quality numbers.

    python scripts/random_pipeline.py sd15 /tmp/sd15-shape --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fewstep.models.toy_tokenizer import toy_merges, toy_vocab  # noqa: E402

# Published configurations (diffusers' model configs for runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0), written out so no download is needed.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
DDPM = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="epsilon", steps_offset=1)


def tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=toy_vocab(), merges=toy_merges(), model_max_length=77)


def on_cpu(cls: Any, **kwargs: Any) -> Any:
    """A scheduler, whose tables live on the CPU whatever device the networks are being built on."""
    with torch.device("cpu"):
        return cls(**DDPM, **kwargs)


def build(family: str) -> Any:
    """The pipeline object with random weights (modules are created on the current default device)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family == "sd15":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=tokenizer(),
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=on_cpu(PNDMScheduler, skip_prk_steps=True,
                                                                   set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)), tokenizer=tokenizer(),
            tokenizer_2=tokenizer(), unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=on_cpu(EulerDiscreteScheduler, timestep_spacing="leading"), add_watermarker=False)
    raise SystemExit(f"error: unknown family {family!r}; choose sd15 or sdxl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=["sd15", "sdxl"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for SDXL)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; pass a new folder", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        pipe = build(args.family)
    pipe.to(dtype=getattr(torch, args.dtype))
    pipe.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"wrote {args.out} ({args.family} shapes, random weights, {n / 1e6:.0f}M UNet parameters, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
