"""Every recipe's export on the shipped flow teacher (toy-digits-sd3), loaded into the stock
StableDiffusion3Pipeline with the recorded scheduler and `pipeline_kwargs`, gives the latents `fewstep sample`
gives for the same seeds. Two training steps per recipe from the shipped presets; LoRA adapters start non-zero
and full students train at a large LR, so a broken export cannot pass (each case also checks that the student
differs from the teacher on the same call).

The stock SD3 pipeline re-noises (the consistency sampler's `stochastic_sampling`) from the global RNG, not from
`generator=`. fewstep draws each image's noise from its own seeded generator: the initial latents first, then one
draw per re-noising. So the stock call reproduces an image by drawing the initial latents from that generator and
handing its state to the global RNG (`torch.set_rng_state(g.get_state())`), one image per call (the README's
recipe)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.paths import BUILTIN  # noqa: E402

ASSET = BUILTIN["toy-digits-sd3"]
pytestmark = pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="toy-digits-sd3 asset not built")
PROMPTS, SEEDS = ["a handwritten digit 3", "a handwritten digit 7"], [11, 12]
CASES = {
    "lcm-lora": ("lcm", "lora", []),
    "lcm-full": ("lcm", "full", ["train.lr=1e-2"]),
    "dmd2-lora": ("dmd2", "lora", []),
    "dmd2-full": ("dmd2", "full", ["train.lr=1e-2"]),
    "dmd2_1step-full": ("dmd2_1step", "full", ["train.lr=1e-2"]),
    "dmd-full": ("dmd", "full", ["train.lr=1e-2"]),
    "phased_dmd-lora": ("phased_dmd", "lora", ["train.lr=5e-2", "train.steps=4", "method.critic_steps_per_student_step=1"]),
    "tdm-lora": ("tdm", "lora", []),
}


def stock_pipeline(path: Path, meta: dict) -> Any:
    import diffusers
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])
    return pipe


def stock_latents(pipe: Any, meta: dict, **extra: Any) -> torch.Tensor:
    """One stock call per image, with fewstep's noise: initial latents from the image's generator, whose state
    then feeds the global RNG the pipeline re-noises from."""
    from fewstep.sampling.engine import initial_noise, seed_generators

    shape = (1, pipe.transformer.config.in_channels, 8, 8)
    out = []
    for prompt, gen in zip(PROMPTS, seed_generators(SEEDS)):
        latents = initial_noise(shape, [gen])
        torch.set_rng_state(gen.get_state())
        out.append(pipe(prompt, latents=latents, output_type="latent", **meta["pipeline_kwargs"], **extra).images)
    return torch.cat(out)


def expert_switch(pipe: Any, meta: dict) -> dict[str, Any]:
    """Phased LoRA exports: every expert loaded as a named adapter, switched after each step (README recipe)."""
    for e in meta["experts"]:
        pipe.load_lora_weights(str(Path(meta["_export"]) / e["adapter"]), adapter_name=e["adapter"])
    owner = [next(e["adapter"] for e in meta["experts"] if t > e["until"]) for t in meta["times"][:-1]]
    pipe.set_adapters(owner[0])

    def switch(p: Any, i: int, t: Any, kwargs: dict) -> dict:   # after the last step: back to the first expert,
        p.set_adapters(owner[(i + 1) % len(owner)])              # so the next call starts with it
        return kwargs

    return {"callback_on_step_end": switch}


@pytest.mark.parametrize("case", list(CASES))
def test_export_reproduced_by_the_stock_pipeline(case: str, tmp_path: Path):
    from fewstep.distill import run
    from fewstep.export import load_export
    from fewstep.sampling.generate import generate_latents

    recipe, mode, extra = CASES[case]
    if recipe == "dmd":                                        # its regression term needs a teacher pairs cache
        from fewstep.models.teacher import load_teacher
        from fewstep.pairs import build_pairs

        build_pairs(load_teacher("toy-digits-sd3"), PROMPTS, [0, 1], 2, 1.0, tmp_path / "pairs")
        extra = [*extra, f"method.pairs_path={tmp_path / 'pairs'}"]
    out = tmp_path / "run"
    run([f"recipe={recipe}", "model=toy-digits-sd3", f"student.mode={mode}", f"output_dir={out}", "train.steps=2",
         "data.batch_size=2", "sample.grid_size=2", "train.progress=false", "train.checkpoint_every=0",
         "train.sample_every=0", "student.lora.init_scale=0.3", *extra])
    export = out / "export"
    meta = json.loads((export / "fewstep.json").read_text())
    assert meta["family"] == "sd3" and meta["pipeline_kwargs"]["max_sequence_length"] == 8
    assert meta["pipeline_kwargs"]["sigmas"] == pytest.approx(meta["times"][:-1], abs=1e-6)
    bundle, spec, _ = load_export(export)
    ours = generate_latents(bundle, spec.wrap(bundle.denoiser()), bundle.net, PROMPTS, SEEDS,
                            torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)
    teacher_only = stock_latents(stock_pipeline(ASSET, meta), meta)
    pipe = stock_pipeline(export if mode == "full" else ASSET, meta)
    call: dict[str, Any] = {}
    if meta["experts"]:
        call = expert_switch(pipe, {**meta, "_export": str(export)})
    elif mode == "lora":
        pipe.load_lora_weights(str(export))
    stock = stock_latents(pipe, meta, **call)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert (stock - teacher_only).abs().max() > 1e-2   # the student is not the teacher: the check can fail


def test_an_export_used_as_a_teacher_keeps_the_original_grid(tmp_path: Path):
    """A full export's own scheduler has shifting off (its stock call passes shifted sigmas), so grids derived from
    it would be unshifted; its sidecar records the original scheduler and an export loaded as a teacher (RTDMD
    stage 2, or any run on an export) derives the original teacher's grids, also through a second export."""
    from fewstep.export import export_student
    from fewstep.models.families.sd3 import flow_teacher_times
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes.base import InferenceSpec
    from fewstep.recipes.build import dmd_student_times

    teacher = load_teacher("toy-digits-sd3")
    times = dmd_student_times(teacher, 4)
    spec = InferenceSpec([float(t) for t in times], "cps:eta=0.9")
    first = load_teacher(str(export_student(teacher, teacher.net, spec, tmp_path / "a", "test", "toy-digits-sd3")))
    assert first.pipe.scheduler.config.shift == 1.0                     # the stock call's scheduler is unchanged
    assert (flow_teacher_times(first.pipe, 4) - times).abs().max() > 0.1   # what the bug derived: unshifted
    torch.testing.assert_close(dmd_student_times(first, 4), times)
    torch.testing.assert_close(first.teacher_times(50), teacher.teacher_times(50))
    assert first.pipe.scheduler.config.shift == 1.0                     # put back after each derivation
    second = load_teacher(str(export_student(first, first.net, spec, tmp_path / "b", "test", str(tmp_path / "a"))))
    torch.testing.assert_close(second.student_times(2), teacher.student_times(2))
