"""Phased DMD on a tiny random-init SD pipeline: one expert per phase, gradients only into the phase being
trained, and an export whose experts a stock pipeline reproduces by switching adapters per step."""
import json
from pathlib import Path

import pytest
import torch

from fewstep.config import load_config
from fewstep.distill import build_run, run


def argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe=phased_dmd", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.log_every=1", "train.progress=false", "student.lora.rank=4",
            "method.critic_rank=4", *extra]


def test_only_the_current_phase_trains(teacher_dir: Path, tmp_path: Path):
    from accelerate import Accelerator

    from fewstep.train.trainer import Trainer

    cfg = load_config(argv(teacher_dir, tmp_path / "r", "train.steps=4", "method.critic_steps_per_student_step=1"))
    teacher, recipe, data = build_run(cfg, "cpu")
    trainer = Trainer(cfg, recipe, teacher, data, Accelerator(cpu=True))
    assert [recipe.phase(i) for i in range(4)] == [0, 0, 1, 1]
    assert recipe.bounds == [(0, 2, pytest.approx(499 / 999)), (2, 4, 0.0)]
    out = recipe.train_step(trainer.batch(0), 0, torch.Generator().manual_seed(0))
    sum(out.losses.values()).backward()
    grads = {n: p.grad for n, p in {**recipe.parameters("student"), **recipe.parameters("critic")}.items()}
    assert all(g is None for n, g in grads.items() if ".phase1." in n or ".critic1." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".phase0." in n)
    assert any(g is not None for n, g in grads.items() if ".critic0." in n)


def test_export_switches_experts_like_a_stock_pipeline(teacher_dir: Path, tmp_path: Path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fewstep.export import load_export
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    out = tmp_path / "x"
    run(argv(teacher_dir, out, "train.steps=4", "method.critic_steps_per_student_step=1", "train.lr=0.05"))
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert [e["adapter"] for e in meta["experts"]] == ["phase0", "phase1"] and meta["timesteps"] == [999, 749, 499, 249]
    student, spec, _ = load_export(out / "export")
    prompts, seeds = ["a cat", "a dog"], [1, 2]
    times = torch.tensor(spec.times, dtype=torch.float64)
    ours = generate_latents(student, student.denoiser(), student.net, prompts, seeds, times, spec.step, 1.0)
    student.experts = [("phase0", 0.0)]                       # phase 0 everywhere: switching must matter
    single = generate_latents(student, student.denoiser(), student.net, prompts, seeds, times, spec.step, 1.0)
    assert (ours - single).abs().max() > 1e-4

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir))
    pipe.set_progress_bar_config(disable=True)
    for e in meta["experts"]:
        pipe.load_lora_weights(str(out / "export" / e["adapter"]), adapter_name=e["adapter"])
    pipe.scheduler = LCMScheduler.from_config(meta["scheduler"]["config"])
    owner = ["phase0", "phase0", "phase1", "phase1"]
    pipe.set_adapters(owner[0])

    def switch(p, i, t, kwargs):
        if i + 1 < len(owner):
            p.set_adapters(owner[i + 1])
        return kwargs

    gens = seed_generators(seeds)
    latents = initial_noise((2, *student.latent_shape()), gens)
    stock = pipe(prompts, timesteps=meta["timesteps"], latents=latents, generator=gens, guidance_scale=1.0,
                 output_type="latent", callback_on_step_end=switch).images
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_bad_phase_split_is_one_clear_error(teacher_dir: Path, tmp_path: Path):
    from fewstep.errors import FewstepError

    cfg = load_config(argv(teacher_dir, tmp_path / "b", "method.phase_steps=[3,2]"))
    with pytest.raises(FewstepError, match=r"must be positive and sum to sample.steps=4"):
        build_run(cfg, "cpu")
