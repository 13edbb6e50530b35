"""Stable Diffusion XL: UNet2DConditionModel with `text_time` added conditioning, two CLIP text encoders.

Same DDPM table, epsilon prediction, DDIM teacher grid and LCMScheduler export as SD1.5 (`SDFamily`); what differs
is the condition: CLIP-L and CLIP-G penultimate hidden states concatenated (`encoder_hidden_states`), the pooled
CLIP-G projection (`text_embeds`) and six micro-conditioning `time_ids` derived from the latent size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.models.families.base import Cond
from fewstep.models.families.sd import SDFamily, guidance_embedding

# SDXL's micro-conditioning is in pixels; every SDXL VAE (and the tiny test one) downsamples by 8.
VAE_FACTOR = 8


def sdxl_time_ids(height: int, width: int, batch: int, device: torch.device) -> Tensor:
    """`original_size + crops_coords_top_left + target_size` as `StableDiffusionXLPipeline._get_add_time_ids`
    builds them with the pipeline's defaults (original = target = (height, width), crop (0, 0)); the pipeline
    uses the same ids for the negative branch. Returns [batch, 6] float32."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return ids.expand(batch, 6)


def check_vae_factor(pipe: Any) -> None:
    """`SDXLFamily.call` derives pixel sizes from latent sizes with `VAE_FACTOR`; refuse a pipeline whose VAE
    downsamples differently rather than feed it wrong time ids."""
    if pipe.vae_scale_factor != VAE_FACTOR:
        raise FewstepError(f"SDXL pipeline has VAE scale factor {pipe.vae_scale_factor}; fewstep's SDXL support "
                           f"needs {VAE_FACTOR} (the micro-conditioning time ids are computed from latent size)")


class SDXLFamily(SDFamily):
    """`StableDiffusionXLPipeline` glue. Cond keys: `encoder_hidden_states` [B, 77, 2048], `text_embeds` [B, 1280];
    the unconditional branch is all zeros (the pipeline's `force_zeros_for_empty_prompt`, also DMD2's and
    LCM-LoRA SDXL's choice), or the encoded "" when the pipeline was saved with that flag off."""

    name = "sdxl"
    net_attr = "unet"
    lora_prefix = "unet"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def pipeline_cls(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Cond:
        """`StableDiffusionXLPipeline.encode_prompt` without CFG: prompt_2 = prompt, penultimate CLIP states."""
        check_vae_factor(pipe)
        device = pipe.text_encoder_2.device
        emb, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb.float(), "text_embeds": pooled.float()}

    def null_cond(self, pipe: Any, n: int) -> Cond:
        """All-zero prompt and pooled embeddings when `pipe.config.force_zeros_for_empty_prompt` (the stock SDXL
        setting: `encode_prompt` zeroes the negative branch when no negative prompt is given), else ""."""
        empty = self.encode_prompts(pipe, [""] * n)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def call(self, net: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        """The pipeline's UNet call: `added_cond_kwargs` = pooled `text_embeds` + `time_ids` for the image size
        that this latent decodes to; LCM's `timestep_cond` when the UNet has a w-embedding."""
        height, width = x.shape[-2] * VAE_FACTOR, x.shape[-1] * VAE_FACTOR
        added = {"text_embeds": cond["text_embeds"].to(x.dtype),
                 "time_ids": sdxl_time_ids(height, width, len(x), x.device).to(x.dtype)}
        tc = guidance_embedding(net, cond, len(x), x.device)
        return net(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype),
                   timestep_cond=None if tc is None else tc.to(x.dtype), added_cond_kwargs=added).sample

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
