"""The spine end to end on a tiny random-init StableDiffusionPipeline: distill -> checkpoint -> resume -> export
-> stock diffusers. Runs in-process (the CLI subprocess path is in test_cli.py)."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fewstep.distill import run
from fewstep.errors import FewstepError


def argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe=lcm", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=4",
            "sample.grid_size=4", "train.log_every=1", "train.progress=false", "student.lora.rank=4",
            "student.lora.alpha=8", "method.num_ddim_timesteps=10", "student.mode=lora", "student.lora.targets=[]",
            *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss/student"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_outputs_and_resume_equality(teacher_dir: Path, tmp_path: Path):
    full = tmp_path / "full"
    run(argv(teacher_dir, full, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"))
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "export/fewstep.json",
                 "export/pytorch_lora_weights.safetensors", "samples/step-0000004.png"):
        assert (full / name).is_file(), name
    reference = losses(full)
    assert len(reference) == 4 and all(torch.isfinite(torch.tensor(reference)))
    # an interrupted copy: only the step-2 checkpoint survived
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    run(argv(teacher_dir, part, "train.steps=4", "train.checkpoint_every=2", "resume=latest"))
    # bit-for-bit on the CPU; cuDNN's backward kernels are not deterministic by default (0.4% seen on an H100)
    tol = dict(rel=2e-2, abs=1e-4) if torch.cuda.is_available() else dict(rel=1e-5, abs=1e-7)
    assert losses(part) == pytest.approx(reference[2:], **tol)


def test_existing_run_is_not_overwritten(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    run(argv(teacher_dir, out, "train.steps=1"))
    before = (out / "checkpoints" / "step-0000001" / "trainable-student.safetensors").read_bytes()
    with pytest.raises(FewstepError, match="is not empty .*; pass resume=latest"):
        run(argv(teacher_dir, out, "train.steps=1"))
    with pytest.raises(FewstepError, match="resume: student.lora.rank is 8 but the run was trained with 4"):
        run(argv(teacher_dir, out, "train.steps=2", "resume=latest", "student.lora.rank=8"))
    assert (out / "checkpoints" / "step-0000001" / "trainable-student.safetensors").read_bytes() == before


def test_lora_export_matches_stock_pipeline(teacher_dir: Path, tmp_path: Path):
    """load_lora_weights + the recorded LCMScheduler and timesteps reproduce our engine on the export, from the
    same initial latents and generators. The LoRA starts non-zero, so a broken export cannot pass."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fewstep.export import load_export
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    out = tmp_path / "x"
    run(argv(teacher_dir, out, "train.steps=1", "student.lora.init_scale=0.3"))
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert meta["scheduler"]["class"] == "LCMScheduler" and meta["timesteps"] == [999, 759, 499, 259]
    assert meta["lora"] == {"rank": 4, "alpha": 8, "targets": ["to_k", "to_out.0", "to_q", "to_v"]}
    teacher, spec, _ = load_export(out / "export")
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    shape = (2, *teacher.latent_shape())
    ours = generate_latents(teacher, teacher.denoiser(), teacher.net, prompts, seeds,
                            torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(meta["scheduler"]["config"])
    gens = seed_generators(seeds)
    latents = initial_noise(shape, gens)
    base = pipe(prompts, timesteps=meta["timesteps"], latents=latents.clone(), generator=gens,
                guidance_scale=1.0, output_type="latent").images
    pipe.load_lora_weights(str(out / "export"))
    gens = seed_generators(seeds)
    latents = initial_noise(shape, gens)
    stock = pipe(prompts, timesteps=meta["timesteps"], latents=latents, generator=gens,
                 guidance_scale=meta["guidance_scale"], output_type="latent").images
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert (stock - base).abs().max() > 1e-2   # the LoRA changes the output: the check can fail


def test_full_mode_with_guidance_embedding_exports_a_pipeline(teacher_dir: Path, tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    run(argv(teacher_dir, out, "train.steps=2", "student.mode=full", "method.guidance_embedding=true",
             "method.embedding_dim=64", "method.guidance_min=1.5", "method.guidance_max=3.0",
             "sample.guidance_scale=2.0"))
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "export"))
    assert pipe.unet.config.time_cond_proj_dim == 64   # method.embedding_dim reaches the student
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert meta["lora"] is None and meta["guidance_scale"] == 2.0
    ckpt = out / "checkpoints" / "step-0000002"
    assert (ckpt / "extra.safetensors").is_file()   # the EMA target network is part of the state


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_lcm_runs_on_every_family(family: str, tmp_path: Path):
    """Two LCM-LoRA steps on each tiny family (VP and flow teachers), then the export reloads and samples."""
    import tiny_pipelines

    from fewstep.export import load_export
    from fewstep.sampling.generate import generate_latents

    teacher = tmp_path / family
    getattr(tiny_pipelines, f"tiny_{family}")().save_pretrained(str(teacher), safe_serialization=True)
    out = tmp_path / "run"
    run(argv(teacher, out, "train.steps=2", "data.batch_size=2", "sample.grid_size=2"))
    bundle, spec, meta = load_export(out / "export")
    assert meta["family"] == family and len(spec.times) == 5
    lat = generate_latents(bundle, bundle.denoiser(), bundle.net, ["a cat"], [0],
                           torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)
    assert torch.isfinite(lat).all() and lat.shape[1:] == bundle.latent_shape()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_export_command_rebuilds_the_export_from_a_checkpoint(teacher_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from fewstep.distill import export_from_checkpoint

    out = tmp_path / "e"
    run(argv(teacher_dir, out, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=5",
             "train.ema_decay=0.5"))
    assert (out / "checkpoints" / "step-0000001" / "ema.pt").is_file()
    again = export_from_checkpoint(str(out), str(tmp_path / "again"))        # newest checkpoint = the final step
    final, rebuilt = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (out / "export", again))
    assert final.keys() == rebuilt.keys()
    assert all(torch.equal(final[k], rebuilt[k]) for k in final)
    earlier = export_from_checkpoint(str(out / "checkpoints" / "step-0000001"))
    first = load_file(str(earlier / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in final)
    assert json.loads((earlier / "fewstep.json").read_text())["train_steps"] == 1


def test_eval_hook_scores_the_student_during_training(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    run(argv(teacher_dir, out, "train.steps=2", "train.eval_every=1", "train.eval_num_images=20"))
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    fids = [r["eval/fid[digits-cnn]"] for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in fids)


def test_unknown_eval_protocol_fails_before_training(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    with pytest.raises(FewstepError, match="nope"):
        run(argv(teacher_dir, out, "train.steps=2", "train.eval_every=1", "train.eval_protocol=nope"))
    assert not out.exists()


@pytest.mark.parametrize("recipe", ["lcm", "dmd2", "dmd2_1step", "dmd", "phased_dmd", "tdm"])
def test_pixart_preset_of_every_recipe_trains_and_exports(recipe: str, tmp_path: Path):
    """`recipe=<r> model=pixart` with the shipped presets (recipes/<r>/pixart.yaml: LoRA student, gradient
    checkpointing, the critic of the recipe) on a tiny random-init PixArtAlphaPipeline: two steps, then the
    export reloads and samples with its own sampler."""
    import tiny_pipelines

    from fewstep.config import load_config
    from fewstep.export import load_export
    from fewstep.sampling.generate import generate_latents

    teacher = tmp_path / "pixart"
    tiny_pipelines.tiny_pixart().save_pretrained(str(teacher), safe_serialization=True)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    data = [f"data.path={tmp_path / 'prompts.txt'}"] if recipe == "tdm" else ["data.source=digits"]
    if recipe == "dmd":                                        # its regression term needs a teacher pairs cache
        from fewstep.models.teacher import load_teacher
        from fewstep.pairs import build_pairs

        build_pairs(load_teacher(str(teacher)), ["a cat", "a dog"], [0, 1], 2, 1.0, tmp_path / "pairs")
        data.append(f"method.pairs_path={tmp_path / 'pairs'}")
    args = [f"recipe={recipe}", "model=pixart", f"teacher.pretrained={teacher}", "teacher.dtype=float32",
            "teacher.resolution=16", "train.mixed_precision=no", f"output_dir={tmp_path / 'run'}", "train.steps=2",
            "data.batch_size=2", "sample.grid_size=2", "train.progress=false", "train.checkpoint_every=0", *data]
    cfg = load_config(args)
    assert cfg.student.mode == "lora" and cfg.student.lora.rank == 64 and cfg.student.gradient_checkpointing
    run(args)
    bundle, spec, meta = load_export(tmp_path / "run" / "export")
    assert meta["family"] == "pixart" and meta["recipe"] == recipe
    lat = generate_latents(bundle, spec.wrap(bundle.denoiser()), bundle.net, ["a cat"], [0],
                           torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)
    assert torch.isfinite(lat).all() and lat.shape[1:] == bundle.latent_shape()


@pytest.mark.parametrize("recipe,extra", [("dmd2", ["method.critic_mode=lora", "method.critic_steps_per_student_step=1"]),
                                          ("phased_dmd", ["method.critic_mode=lora", "method.phase_steps=[2,2]",
                                                          "method.critic_steps_per_student_step=1"])])
def test_gradient_checkpointing_recomputes_with_each_roles_adapter(recipe: str, extra: list[str], teacher_dir: Path,
                                                                    tmp_path: Path):
    """Roles that are LoRA adapters on one base (student and critic, phase experts) train the same with gradient
    checkpointing as without: each block is recomputed with the adapter live in its forward. diffusers' default
    recomputed the critic's blocks with the student's adapter (DMD2: critic grad norm 0.00731 instead of 0.00828 on
    the toy, silently) and a phase expert's with another phase's (an error)."""
    from safetensors.torch import load_file

    weights = {}
    for gc in ("false", "true"):
        out = tmp_path / gc
        run([f"recipe={recipe}", f"teacher.pretrained={teacher_dir}", f"output_dir={out}", "train.steps=2",
             "data.batch_size=2", "sample.grid_size=2", "train.progress=false", "train.sample_every=0",
             "student.mode=lora", "student.lora.rank=4", "method.critic_rank=4",
             f"student.gradient_checkpointing={gc}", *extra])
        ckpt = out / "checkpoints" / "step-0000002"
        weights[gc] = {p.stem: load_file(str(p)) for p in ckpt.glob("trainable-*.safetensors")}
    assert set(weights["true"]) == {"trainable-student", "trainable-critic"}
    for role, tensors in weights["false"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(weights["true"][role][key], value, rtol=1e-5, atol=1e-7, msg=f"{role} {key}")


def test_text_embedding_cache_switch_changes_cost_not_conditions():
    """train.text_embedding_cache=false encodes every batch again; the conditions are the same either way."""
    from types import SimpleNamespace

    from fewstep.train.trainer import PromptCache

    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return {"e": torch.tensor([[float(len(p)), float(ord(p[0]))] for p in prompts])}

    teacher = SimpleNamespace(encode_prompts=encode)
    batches = [["a cat", "a dog", "a cat"], ["a dog", "tree"], ["a cat", "tree"]]
    cached, uncached = PromptCache(teacher), PromptCache(teacher, limit=0)
    for b in batches:
        torch.testing.assert_close(cached(b)["e"], uncached(b)["e"], rtol=0, atol=0)
        torch.testing.assert_close(cached(b)["e"], encode(b)["e"], rtol=0, atol=0)
    calls.clear()
    for b in batches:
        cached(b)
    assert calls == []                                              # all three prompts are cached by now
    for b in batches:
        uncached(b)
    assert calls == [["a cat", "a dog"], ["a dog", "tree"], ["a cat", "tree"]]   # each batch's distinct prompts
