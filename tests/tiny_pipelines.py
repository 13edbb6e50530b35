"""Tiny, seeded, randomly initialised stock Diffusers pipelines for offline tests (no hub, no downloads).

Every network has well under 100 k parameters. Tokenizers are built in memory: the toy 56-entry CLIP BPE
(`fewstep.models.toy_tokenizer`, prompts "a handwritten digit N") and a small T5 Unigram tokenizer over the same
words. Calling a factory twice with the same seed gives identical weights (a "fresh" pipeline for LoRA reloads).

Sizes (pixels -> latents): SD/SD3/FLUX/PixArt 16x16 -> 8x8 (VAE factor 2); SDXL 64x64 -> 8x8 (VAE factor 8, as
SDXL's micro-conditioning assumes).
"""
from __future__ import annotations

import os
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fewstep.models.toy_tokenizer import build_tokenizer  # noqa: E402

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
T5_WORDS = ["a", "handwritten", "digit"] + [str(d) for d in range(10)]

VP_DDIM = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)
CLIP = dict(vocab_size=56, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
T5 = dict(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Run `fn()` under `torch.manual_seed(seed)` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5 tokenizer (transformers 5 `T5Tokenizer`, tokenizers-backed) on an in-memory Unigram vocabulary:
    <pad>=0, </s>=1, <unk>=2, then "▁word" pieces and single characters as a fallback."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(T5_WORDS)))
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + [f"▁{w}" for w in T5_WORDS] + chars
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip(seed: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(CLIPTextConfig(**CLIP))).eval()


def _t5(seed: int, vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return _seeded(seed, lambda: T5EncoderModel(T5Config(vocab_size=vocab_size, **T5))).eval()


def _vae(seed: int, latent_channels: int = 4, blocks: int = 2, flow: bool = False) -> Any:
    """Tiny AutoencoderKL; `flow=True` mirrors the SD3/FLUX VAE (16 channels, shift_factor, no quant convs)."""
    from diffusers import AutoencoderKL

    kw: dict[str, Any] = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                              up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                              layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                              sample_size=16)
    if flow:
        kw.update(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return _seeded(seed, lambda: AutoencoderKL(**kw)).eval()


def _unet(seed: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    kw: dict[str, Any] = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                              layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                              attention_head_dim=4, norm_num_groups=4)
    return _seeded(seed, lambda: UNet2DConditionModel(**{**kw, **extra})).eval()


def _ddim(**overrides: Any) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**VP_DDIM, **overrides})


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd(seed: int = 0) -> Any:
    """StableDiffusionPipeline: CLIP + UNet (eps, scaled-linear DDPM), DDIM trailing."""
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_clip(seed + 1, False), tokenizer=build_tokenizer(), unet=_unet(seed + 2),
        scheduler=_ddim(timestep_spacing="trailing", steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))


def tiny_sdxl(seed: int = 0) -> Any:
    """StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection, UNet with `text_time` added
    conditioning (6 time ids x 4 + 16 pooled), VAE factor 8, DDIM leading (SDXL's stock spacing)."""
    from diffusers import StableDiffusionXLPipeline

    unet = _unet(seed + 2, cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + CLIP["projection_dim"])
    return _quiet(StableDiffusionXLPipeline(
        vae=_vae(seed, blocks=4), text_encoder=_clip(seed + 1, False), text_encoder_2=_clip(seed + 3, True),
        tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(), unet=unet,
        scheduler=_ddim(timestep_spacing="leading", steps_offset=1), add_watermarker=False))


def tiny_sd3(seed: int = 0, t5: bool = True) -> Any:
    """StableDiffusion3Pipeline: two CLIPs with projection, optional T5 (`t5=False` gives text_encoder_3=None),
    SD3Transformer2DModel (patch 2), FlowMatchEulerDiscreteScheduler with static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    net = _seeded(seed + 2, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=16)).eval()
    tok3 = t5_tokenizer() if t5 else None
    return _quiet(StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(seed, 16, flow=True),
        text_encoder=_clip(seed + 1, True), tokenizer=build_tokenizer(), text_encoder_2=_clip(seed + 3, True),
        tokenizer_2=build_tokenizer(), text_encoder_3=_t5(seed + 4, len(tok3)) if t5 else None,
        tokenizer_3=tok3))


def tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> Any:
    """FluxPipeline: CLIP (pooled) + T5, FluxTransformer2DModel on 2x2-packed 16-channel latents, guidance
    embedding (FLUX.1-dev style) unless `guidance_embeds=False`, dynamic-shift FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    net = _seeded(seed + 2, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    tok2 = t5_tokenizer()
    return _quiet(FluxPipeline(
        scheduler=sched, vae=_vae(seed, 16, flow=True), text_encoder=_clip(seed + 1, False),
        tokenizer=build_tokenizer(), text_encoder_2=_t5(seed + 4, len(tok2)), tokenizer_2=tok2, transformer=net))


def tiny_pixart(seed: int = 0) -> Any:
    """PixArtAlphaPipeline: T5 + PixArtTransformer2DModel (learned sigma: 2x4 output channels), linear DDPM betas
    (PixArt-alpha), DDIM leading. sample_size 8, so `use_resolution_binning=False` must be passed to __call__."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    net = _seeded(seed + 2, lambda: PixArtTransformer2DModel(
        sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=16, caption_channels=32)).eval()
    tok = t5_tokenizer()
    sched = _ddim(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="leading",
                  steps_offset=1)
    return _quiet(PixArtAlphaPipeline(tokenizer=tok, text_encoder=_t5(seed + 4, len(tok)), vae=_vae(seed),
                                      transformer=net, scheduler=sched))


FACTORIES: dict[str, Callable[..., Any]] = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux,
                                            "pixart": tiny_pixart}


def free_port() -> str:
    """A TCP port nobody listens on now, for `accelerate launch --main_process_port` (two launches in a row on the
    default 29500 can collide while the first one's sockets close)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
