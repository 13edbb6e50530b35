"""Family glue against the stock Diffusers pipelines, on tiny random-init pipelines (tests/tiny_pipelines.py).

(a) oracle: fewstep's engine (Denoiser + Guided + ddim_step on `teacher_times`) reproduces `pipe(...,
    output_type="latent")` from the same initial latents; (b) VAE encode/decode shapes, range and the pipeline's
    decode; (c) a peft LoRA saved the diffusers way reloads into a fresh stock pipeline with identical output.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.errors import FewstepError  # noqa: E402
from fewstep.models.denoiser import Denoiser, Guided  # noqa: E402
from fewstep.models.families import FAMILIES, family_for  # noqa: E402
from fewstep.models.families.flux import pack_latents, unpack_latents  # noqa: E402
from fewstep.models.lora import (add_lora, load_lora, lora_config, lora_state_dict, save_lora,  # noqa: E402
                                 supports_stock_lora)
from fewstep.sampling.engine import sample  # noqa: E402
from fewstep.sampling.steps import consistency_step, ddim_step, randn  # noqa: E402
from tiny_pipelines import FACTORIES, PROMPTS  # noqa: E402

# family -> (pixel size, CFG scale used by both sides (1.0: the family runs without CFG), extra pipeline kwargs)
CASES: dict[str, tuple[int, float, dict[str, Any]]] = {
    "sd": (16, 3.0, {}),
    "sdxl": (64, 3.0, {}),
    "sd3": (16, 3.0, {}),
    "flux": (16, 1.0, {}),
    "pixart": (16, 3.0, {"use_resolution_binning": False}),
}
STEPS = 4
ORACLE_TOL = 1e-4
ORACLE_DIFFS: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run fastest single-threaded; on a busy 2-core box OpenMP spinning made them ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pipe(name: str, **kw: Any) -> Any:
    return FACTORIES[name](**kw)


def _noise(family: Any, pipe: Any, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((len(PROMPTS), *family.latent_shape(pipe, size, size)), generator=gen)


def _ours(family: Any, pipe: Any, noise: torch.Tensor, size: int, scale: float,
          extra_cond: dict[str, torch.Tensor] | None = None, step: Any = ddim_step, generator: Any = None) -> torch.Tensor:
    """fewstep's sampler: Denoiser (+ Guided when scale > 1) on the family's teacher grid, deterministic DDIM."""
    schedule = family.schedule(pipe)
    den = Denoiser(getattr(pipe, family.net_attr), schedule, family.prediction(pipe), call=family.call)
    cond: Any = {**family.encode_prompts(pipe, PROMPTS), **(extra_cond or {})}
    model: Any = den
    if scale > 1:
        model, cond = Guided(den, scale), {"pos": cond, "neg": family.null_cond(pipe, len(PROMPTS))}
    times = family.teacher_times(pipe, STEPS, size, size)
    assert times[-1] == 0 and len(times) == STEPS + 1
    noise_fn = getattr(family, "draw_noise", randn)
    return sample(model, noise, times, schedule, cond=cond, step=step, generator=generator, noise_fn=noise_fn)


def _stock(name: str, pipe: Any, noise: torch.Tensor, size: int, scale: float, **kw: Any) -> torch.Tensor:
    """The stock pipeline from the same latents; FLUX takes and returns packed tokens."""
    packed = name == "flux"
    latents = pack_latents(noise) if packed else noise
    args: dict[str, Any] = {"num_inference_steps": STEPS, **CASES[name][2]}
    if name != "flux":
        args["guidance_scale"] = scale
    out = pipe(PROMPTS, latents=latents, output_type="latent", height=size, width=size, **{**args, **kw}).images
    return unpack_latents(out, *noise.shape[-2:]) if packed else out


def _check_oracle(key: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    ORACLE_DIFFS[key] = diff
    print(f"\noracle {key}: max |diff| {diff:.2e} (max |x| {ref.abs().max().item():.2f})")
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    assert diff < ORACLE_TOL


@pytest.mark.parametrize("name", list(CASES))
def test_oracle_matches_stock_pipeline(name: str) -> None:
    pipe, family = _pipe(name), FAMILIES[name]
    assert family_for(pipe) is family
    size, scale, _ = CASES[name]
    noise = _noise(family, pipe, size)
    _check_oracle(name, _ours(family, pipe, noise, size, scale), _stock(name, pipe, noise, size, scale))


def test_oracle_sd3_without_t5() -> None:
    """`text_encoder_3=None`: the pipeline (and the family through it) fills the T5 part with zeros."""
    pipe, family = _pipe("sd3", t5=False), FAMILIES["sd3"]
    assert pipe.text_encoder_3 is None
    noise = _noise(family, pipe, 16, seed=1)
    _check_oracle("sd3-no-t5", _ours(family, pipe, noise, 16, 2.0), _stock("sd3", pipe, noise, 16, 2.0))


def test_oracle_flux_explicit_guidance_and_schnell() -> None:
    """cond["guidance"] reaches the guidance embedding like the pipeline's guidance_scale; without
    `guidance_embeds` (schnell-like) no guidance is passed at all."""
    family = FAMILIES["flux"]
    pipe = _pipe("flux")
    noise = _noise(family, pipe, 16, seed=2)
    ours = _ours(family, pipe, noise, 16, 1.0, {"guidance": torch.full((len(PROMPTS),), 2.0)})
    _check_oracle("flux-guidance-2", ours, _stock("flux", pipe, noise, 16, 1.0, guidance_scale=2.0))
    default = _ours(family, pipe, noise, 16, 1.0)
    assert (default - ours).abs().max() > 1e-4  # the guidance input matters, so the check above can fail
    schnell = _pipe("flux", guidance_embeds=False)
    _check_oracle("flux-no-guidance-embeds", _ours(family, schnell, noise, 16, 1.0),
                  _stock("flux", schnell, noise, 16, 1.0))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_student_export_runs_our_grid(name: str) -> None:
    """A stock pipeline with `student_scheduler` and `pipeline_call_kwargs` runs exactly our consistency sampler
    (x0, re-noise) on our (already shifted) grid: no second shift, the same noise from the same generators."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, family = _pipe(name), FAMILIES[name]
    size, scale, _ = CASES[name]
    times = torch.tensor([1.0, 0.9, 0.6, 0.25, 0.0], dtype=torch.float64)
    family.teacher_times = lambda *_: times  # type: ignore[method-assign]  # instance attribute, undone below
    try:
        noise = _noise(family, pipe, size, seed=5)
        ours = _ours(family, pipe, noise, size, scale, step=consistency_step,
                     generator=torch.Generator().manual_seed(100))
    finally:
        del family.teacher_times
    cls_name, config = family.student_scheduler(pipe)
    assert cls_name == "FlowMatchEulerDiscreteScheduler"
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = family.pipeline_call_kwargs(pipe, times, size, size)
    # SD3/FLUX pipelines do not pass `generator` to `scheduler.step`: re-noising draws from the global RNG
    torch.manual_seed(100)
    _check_oracle(f"{name}-student-export", ours, _stock(name, pipe, noise, size, scale, **kwargs))
    deterministic = _ours(family, pipe, noise, size, scale)
    assert (deterministic - ours).abs().max() > 1e-3   # re-noising matters, so the check above can fail



def test_flux_packing_matches_pipeline() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    tokens = FluxPipeline._pack_latents(x, 2, 16, 8, 6)
    assert torch.equal(pack_latents(x), tokens)
    assert torch.equal(unpack_latents(tokens, 8, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 16, 12, 2), x)
    with pytest.raises(FewstepError):
        pack_latents(torch.randn(1, 16, 7, 8))


def test_sdxl_null_cond_is_zeros_and_time_ids_follow_size() -> None:
    pipe, family = _pipe("sdxl"), FAMILIES["sdxl"]
    null = family.null_cond(pipe, 3)
    assert set(null) == {"encoder_hidden_states", "text_embeds"} and all(bool((v == 0).all()) for v in null.values())
    assert null["encoder_hidden_states"].shape == (3, 16, 32) and null["text_embeds"].shape == (3, 16)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    assert (family.null_cond(pipe, 1)["encoder_hidden_states"] != 0).any()


@pytest.mark.parametrize("name", list(CASES))
def test_teacher_null_cond_encodes_once_and_equals_the_per_row_encoding(name: str) -> None:
    """Teacher.null_cond encodes one row and copies it; the family's n-row encoding must be the same tensors."""
    from fewstep.models.teacher import Teacher

    pipe, family = _pipe(name), FAMILIES[name]
    ours, ref = Teacher(pipe, family, name).null_cond(3), family.null_cond(pipe, 3)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape and ours[k].is_contiguous()
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_encode_decode(name: str) -> None:
    pipe, family = _pipe(name), FAMILIES[name]
    size = CASES[name][0]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = family.encode_images(pipe, images)
    assert x0.dtype == torch.float32 and x0.shape == (2, *family.latent_shape(pipe, size, size))
    img = family.decode(pipe, x0)
    assert img.dtype == torch.float32 and img.shape == images.shape
    assert 0.0 <= img.min().item() and img.max().item() <= 1.0
    vae = pipe.vae
    z = x0 / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    ref = pipe.image_processor.postprocess(vae.decode(z).sample, output_type="pt")  # the pipelines' decode
    assert (img - ref).abs().max().item() < 1e-5


def _probe(family: Any, pipe: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((len(PROMPTS), *family.latent_shape(pipe, size, size)), generator=gen)
    t = torch.tensor([0.7, 0.3])
    return x, family.schedule(pipe).model_timestep(t), family.encode_prompts(pipe, PROMPTS)


def _randomize_lora_b(net: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("via", ["stock", "helpers"])
@pytest.mark.parametrize("name", list(CASES))
def test_lora_roundtrip(name: str, via: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    size = CASES[name][0]
    pipe = _pipe(name)
    net = getattr(pipe, family.net_attr)
    x, timestep, cond = _probe(family, pipe, size)
    with torch.no_grad():
        base = family.call(net, x, timestep, cond)
        add_lora(net, lora_config(family.lora_targets))
        _randomize_lora_b(net)
        trained = family.call(net, x, timestep, cond)
    assert (trained - base).abs().max().item() > 1e-3  # the adapter changes the output
    fresh = _pipe(name)
    stock = supports_stock_lora(family.pipeline_cls)
    assert stock == (name != "pixart")  # diffusers 0.42 has no PixArt LoRA loader
    if via == "stock" and stock:
        layers = lora_state_dict(net)
        assert layers
        family.pipeline_cls.save_lora_weights(str(tmp_path), **{f"{family.lora_prefix}_lora_layers": layers})
        fresh.load_lora_weights(str(tmp_path))
    elif via == "stock":  # PixArt: peft's own loader on the exported folder
        from peft import PeftModel

        save_lora(family, net, tmp_path)
        fresh_net = PeftModel.from_pretrained(getattr(fresh, family.net_attr), str(tmp_path / family.net_attr))
        setattr(fresh, family.net_attr, fresh_net.base_model.model)
    else:
        save_lora(family, net, tmp_path)
        load_lora(family, fresh, tmp_path)
    with torch.no_grad():
        reloaded = family.call(getattr(fresh, family.net_attr), x, timestep, cond)
    assert (reloaded - trained).abs().max().item() < 1e-5


def test_unsupported_pipeline_raises() -> None:
    class NotAPipeline:
        pass

    with pytest.raises(FewstepError):
        family_for(NotAPipeline())


@pytest.mark.parametrize("offload", [False, True])
def test_offloaded_frozen_parts_move_to_the_device_only_while_they_run(offload: bool, monkeypatch):
    """train.offload_frozen: the text encoders go to the denoiser's device for a prompt encoding and the VAE for an
    image encoding or a decode, each back in CPU memory right after; the results are the same as without the
    switch; and without it nothing moves (the CPU run here records the moves instead of seeing device changes)."""
    from fewstep.models.teacher import Teacher

    teacher = Teacher(pipe=FACTORIES["sd"](), family=FAMILIES["sd"], name="tiny-sd")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    plain = teacher.encode_prompts(["a cat"]), teacher.encode_images(images), teacher.decode(torch.randn(1, 4, 4, 4))
    if offload:
        teacher.offload_frozen()
    moves: list[tuple[str, str]] = []
    real_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        moves.append((type(module).__name__, str(args[0] if args else kwargs.get("device"))))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    cond = teacher.encode_prompts(["a cat"])
    text_moves, moves[:] = list(moves), []
    torch.manual_seed(0)
    x0 = teacher.encode_images(images)
    vae_moves, moves[:] = list(moves), []
    img = teacher.decode(torch.randn(1, 4, 4, 4))
    decode_moves = list(moves)
    if not offload:
        assert text_moves == vae_moves == decode_moves == []
    else:
        assert text_moves == [("CLIPTextModel", "cpu"), ("CLIPTextModel", "cpu")]   # to the net's device, back
        assert vae_moves == decode_moves == [("AutoencoderKL", "cpu"), ("AutoencoderKL", "cpu")]
    torch.testing.assert_close(cond["encoder_hidden_states"], plain[0]["encoder_hidden_states"])
    assert x0.shape == plain[1].shape and img.shape == plain[2].shape
