"""PixArt-alpha / PixArt-sigma: PixArtTransformer2DModel (DiT with adaLN-single) on a DDPM table, T5 text encoder.

Epsilon prediction with learned variance: the transformer outputs 2C channels (eps, variance) and, like the
pipelines, only the first C are used. Schedule, teacher grid and LCMScheduler export are SD1.5's (`SDFamily`).

LoRA: diffusers 0.42 has no LoRA loader mixin for `PixArtAlphaPipeline` / `PixArtSigmaPipeline` (no
`save_lora_weights` / `load_lora_weights`) and `PixArtTransformer2DModel` has no `add_adapter`. Adapters are
therefore injected with peft and exported in peft's own format under `<dir>/transformer`
(`fewstep.models.lora.save_lora` / `load_lora`; stock use: `PeftModel.from_pretrained(pipe.transformer, ...)`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models.families.base import Cond
from fewstep.models.families.sd import SDFamily
from fewstep.models.families.sd3 import pipeline_default

# PixArt's resolution conditioning is in pixels; its VAE (SD's) downsamples by 8.
VAE_FACTOR = 8


def resolution_cond(net: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    """`added_cond_kwargs` as the pipelines build them: None/None unless the transformer uses additional
    conditions (PixArt-alpha 1024, `sample_size == 128`), then [B, 2] (height, width) in pixels and [B, 1]
    aspect ratio height / width."""
    if not getattr(net, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    height, width = x.shape[-2] * VAE_FACTOR, x.shape[-1] * VAE_FACTOR
    res = torch.tensor([height, width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    ratio = torch.tensor([height / width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    return {"resolution": res, "aspect_ratio": ratio}


def split_learned_sigma(net: nn.Module, out: Tensor, channels: int) -> Tensor:
    """Keep the eps half of a learned-sigma output (the pipelines' `out_channels // 2 == latent_channels`)."""
    if net.config.out_channels // 2 == channels:
        return out[:, :channels]
    return out


def caption_cleaning(pipe: Any) -> bool:
    """The caption cleaning a default pipeline call applies: `clean_caption=True`, which `_text_preprocessing`
    turns off (logging two warnings per call) unless bs4 and ftfy are installed; decided here once, quietly."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return bool(pipeline_default(pipe, "clean_caption")) and is_bs4_available() and is_ftfy_available()


class PixArtFamily(SDFamily):
    """`PixArtAlphaPipeline` / `PixArtSigmaPipeline` glue. Cond keys: `encoder_hidden_states` [B, L, 4096] (T5,
    L = 120 alpha / 300 sigma) and `encoder_attention_mask` [B, L] (float 0/1); unconditional = "" through T5,
    the pipelines' default negative prompt."""

    name = "pixart"
    net_attr = "transformer"
    lora_prefix = "transformer"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def pipeline_cls(self) -> type:
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond:
        """`encode_prompt` without CFG at the pipeline's default `max_sequence_length` and `clean_caption`."""
        emb, mask, _, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=pipe.text_encoder.device,
            clean_caption=caption_cleaning(pipe), max_sequence_length=pipeline_default(pipe, "max_sequence_length"))
        return {"encoder_hidden_states": emb.float(), "encoder_attention_mask": mask.float()}

    def null_cond(self, pipe: Any, n: int) -> Cond:
        return self.encode_prompts(pipe, [""] * n)

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        out = net(x, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype),
                  encoder_attention_mask=cond["encoder_attention_mask"], timestep=timestep,
                  added_cond_kwargs=resolution_cond(net, x)).sample
        return split_learned_sigma(net, out, x.shape[1])

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, height // f, width // f)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)
