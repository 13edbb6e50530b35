"""Phased DMD on a tiny random-init SD pipeline: one expert per phase (LoRA adapters or full network copies),
gradients only into the phase being trained, resume, and an export whose experts a stock pipeline reproduces by
switching adapters (or UNets) per step."""
import json
from pathlib import Path

import pytest
import torch

from fewstep.config import load_config
from fewstep.distill import build_run, run
from fewstep.sampling.draws import Draws


def argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    """The recipe's generic settings (LoRA experts, the default grid), not the toy-digits pair preset's."""
    return ["recipe=phased_dmd", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.log_every=1", "train.progress=false", "student.lora.rank=4",
            "method.critic_rank=4", "student.mode=lora", "method.critic_mode=lora", "sample.timesteps=[]",
            "method.real_guidance=2.0", *extra]


def test_only_the_current_phase_trains(teacher_dir: Path, tmp_path: Path):
    from accelerate import Accelerator

    from fewstep.train.trainer import Trainer

    cfg = load_config(argv(teacher_dir, tmp_path / "r", "train.steps=4", "method.critic_steps_per_student_step=1"))
    teacher, recipe, data = build_run(cfg, "cpu")
    trainer = Trainer(cfg, recipe, teacher, data, Accelerator(cpu=True))
    assert [recipe.phase(i) for i in range(4)] == [0, 0, 1, 1]
    assert recipe.bounds == [(0, 2, pytest.approx(499 / 999)), (2, 4, 0.0)]
    out = recipe.train_step(trainer.batch(0), 0, Draws.from_generator(torch.Generator().manual_seed(0)))
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
    ours = generate_latents(student, spec.wrap(student.denoiser()), student.net, prompts, seeds, times, spec.step, 1.0)
    spec.experts = [("phase0", 0.0)]                          # phase 0 everywhere: switching must matter
    single = generate_latents(student, spec.wrap(student.denoiser()), student.net, prompts, seeds, times, spec.step, 1.0)
    assert (ours - single).abs().max() > 1e-4

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir))
    pipe.set_progress_bar_config(disable=True)
    for e in meta["experts"]:
        pipe.load_lora_weights(str(out / "export" / e["adapter"]), adapter_name=e["adapter"])
    pipe.scheduler = LCMScheduler.from_config(meta["scheduler"]["config"])
    owner = ["phase0", "phase0", "phase1", "phase1"]
    pipe.set_adapters(owner[0])

    def switch(p, i, t, kwargs):               # after the last step: back to the first expert
        p.set_adapters(owner[(i + 1) % len(owner)])
        return kwargs

    gens = seed_generators(seeds)
    latents = initial_noise((2, *student.latent_shape()), gens)
    stock = pipe(prompts, timesteps=meta["timesteps"], latents=latents, generator=gens, guidance_scale=1.0,
                 output_type="latent", callback_on_step_end=switch).images
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_bad_phase_split_is_one_clear_error(teacher_dir: Path, tmp_path: Path):
    from fewstep.errors import FewstepError

    with pytest.raises(FewstepError, match=r"must be positive and sum to sample.steps=4"):
        load_config(argv(teacher_dir, tmp_path / "b", "method.phase_steps=[3,2]"))   # at load, before any model


def owns(name: str, key: str) -> bool:
    """Parameter `key` belongs to expert/critic `name` (full copies: a "name." prefix; LoRA: a ".name." infix)."""
    return key.startswith(f"{name}.") or f".{name}." in key


@pytest.mark.parametrize("critic_mode", ["lora", "full"])
def test_full_experts_only_the_current_phase_trains(teacher_dir: Path, tmp_path: Path, critic_mode: str):
    from accelerate import Accelerator

    from fewstep.train.trainer import Trainer

    cfg = load_config(argv(teacher_dir, tmp_path / "r", "student.mode=full", f"method.critic_mode={critic_mode}",
                           "train.steps=4", "method.critic_steps_per_student_step=1"))
    teacher, recipe, data = build_run(cfg, "cpu")
    trainer = Trainer(cfg, recipe, teacher, data, Accelerator(cpu=True))
    student, critic = recipe.parameters("student"), recipe.parameters("critic")
    assert {k.split(".")[0] for k in student} == {"phase0", "phase1"}
    assert not set(map(id, student.values())) & {id(p) for p in teacher.net.parameters()}
    out = recipe.train_step(trainer.batch(0), 0, Draws.from_generator(torch.Generator().manual_seed(0)))
    sum(out.losses.values()).backward()
    grads = {n: p.grad for n, p in {**student, **critic}.items()}
    assert all(g is None for n, g in grads.items() if owns("phase1", n) or owns("critic1", n))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if owns("phase0", n))
    assert any(g is not None for n, g in grads.items() if owns("critic0", n))
    base = {n: p.detach().clone() for n, p in teacher.net.named_parameters() if "lora_" not in n}
    phase1 = {n: p.detach().clone() for n, p in student.items() if owns("phase1", n)}
    for _ in range(2):                                          # steps 0 and 1: phase 0 only
        trainer.train_iteration()
        trainer.step += 1
    assert all(torch.equal(phase1[n], student[n]) for n in phase1)
    trainer.train_iteration()                                   # step 2: phase 1
    assert any(not torch.equal(phase1[n], student[n]) for n in phase1)
    assert all(torch.equal(base[n], p) for n, p in teacher.net.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in teacher.net.named_parameters() if "lora_" not in n)


def test_full_experts_resume_from_a_checkpoint_holding_every_expert(teacher_dir: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file

    common = ("student.mode=full", "train.steps=3", "train.checkpoint_every=2", "method.critic_steps_per_student_step=1")
    full = tmp_path / "full"
    run(argv(teacher_dir, full, *common))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if "loss" in k)
    saved = load_file(str(full / "checkpoints" / "step-0000002" / "trainable-student.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"phase0", "phase1"}
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    run(argv(teacher_dir, part, *common, "resume=latest"))
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]
    for key in ("loss/student", "loss/critic"):
        assert resumed[0][key] == pytest.approx(rows[2][key], rel=1e-5)


def test_full_expert_export_switches_unets_like_a_stock_pipeline(teacher_dir: Path, tmp_path: Path):
    """The README recipe: the export's shared pipeline plus one UNet per phase, swapped in `callback_on_step_end`,
    reproduces `load_export` and `fewstep sample` on the same initial latents and generators."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    from fewstep.cli import main
    from fewstep.export import load_export
    from fewstep.sample import to_pil
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    out = tmp_path / "x"
    run(argv(teacher_dir, out, "student.mode=full", "train.steps=4", "method.critic_steps_per_student_step=1"))
    export = out / "export"
    assert (out / "samples" / "step-0000004.png").is_file()             # the preview grid switched experts too
    meta = json.loads((export / "fewstep.json").read_text())
    assert [(e["adapter"], e["kind"]) for e in meta["experts"]] == [("phase0", "full"), ("phase1", "full")]
    assert json.loads((export / "model_index.json").read_text())["unet"] == [None, None]
    assert not (export / "unet").exists() and meta["lora"] is None
    unet = UNet2DConditionModel.from_pretrained(str(export / "phase1"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                                      # make the experts differ by a visible margin
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    unet.save_pretrained(str(export / "phase1"), safe_serialization=True)

    student, spec, _ = load_export(export)
    prompts, seeds = ["a cat", "a dog"], [1, 2]
    times, w = torch.tensor(spec.times, dtype=torch.float64), meta["guidance_scale"]
    ours = generate_latents(student, spec.wrap(student.denoiser()), student.net, prompts, seeds, times, spec.step, w)
    experts = spec.experts
    spec.experts = [(experts[0][0], 0.0)]                      # phase 0 everywhere: switching must matter
    single = generate_latents(student, spec.wrap(student.denoiser()), student.net, prompts, seeds, times, spec.step, w)
    assert (ours - single).abs().max() > 1e-3
    spec.experts = experts

    nets = {e["adapter"]: UNet2DConditionModel.from_pretrained(str(export / e["adapter"])) for e in meta["experts"]}
    pipe = StableDiffusionPipeline.from_pretrained(str(export), unet=nets["phase0"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == meta["scheduler"]["class"]
    owner = [next(e["adapter"] for e in meta["experts"] if t > e["until"]) for t in meta["times"][:-1]]
    assert owner == ["phase0", "phase0", "phase1", "phase1"]

    def switch(p, i, t, kwargs):               # the README's recipe: after the last step, back to the first
        p.unet = nets[owner[(i + 1) % len(owner)]]   # expert, so the next call starts with it
        return kwargs

    gens = seed_generators(seeds)
    latents = initial_noise((2, *student.latent_shape()), gens)
    stock = torch.cat([pipe(prompts[k], timesteps=meta["timesteps"], latents=latents[k:k + 1], generator=gens[k],
                            guidance_scale=w, output_type="latent", callback_on_step_end=switch).images
                       for k in range(2)])           # one call per image: the second starts where the first left
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    main(["sample", str(export), "--out", str(tmp_path / "s"), "--num-images", "2", "--seed", "1",
          "--prompts", str(tmp_path / "p.txt"), "--device", "cpu"])
    images = student.family.decode(student.pipe, ours)
    for k, img in enumerate(images):
        with Image.open(tmp_path / "s" / f"{k:05d}.png") as png:
            assert list(png.convert("RGB").getdata()) == list(to_pil(img, False).getdata())
