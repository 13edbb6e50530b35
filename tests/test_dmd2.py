"""DMD2 on tiny random-init pipelines: gradient isolation between student and critic, the frozen teacher,
two time-scale counting across resume, the GAN head, every family end to end."""
import json
from pathlib import Path

import pytest
import torch

from fewstep.config import load_config
from fewstep.distill import build_run, run
from fewstep.sampling.draws import Draws
from fewstep.train.trainer import Trainer


def argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe=dmd2", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=4",
            "sample.grid_size=2", "train.log_every=1", "train.progress=false", "student.lora.rank=4",
            "method.critic_rank=4", "method.gan_generator_weight=0.01", "method.gan_critic_weight=0.01",
            "student.mode=lora", "method.critic_mode=lora", "student.lora.targets=[]", *extra]


def make(teacher_dir: Path, tmp_path: Path, *extra: str):
    from accelerate import Accelerator

    cfg = load_config(argv(teacher_dir, tmp_path / "r", *extra))
    teacher, recipe, dataset = build_run(cfg, "cpu")
    return Trainer(cfg, recipe, teacher, dataset, Accelerator(cpu=True)), recipe, teacher


def _grads(params: dict) -> list:
    return [p.grad for p in params.values()]


@pytest.mark.parametrize("critic_mode", ["lora", "full"])
def test_gradient_isolation(teacher_dir: Path, tmp_path: Path, critic_mode: str):
    trainer, recipe, teacher = make(teacher_dir, tmp_path, f"method.critic_mode={critic_mode}")
    batch, gen = trainer.batch(0), torch.Generator().manual_seed(0)
    student, critic = recipe.parameters("student"), recipe.parameters("critic")
    assert student and critic and not set(map(id, student.values())) & set(map(id, critic.values()))
    assert any(k.startswith("gan_head.") for k in critic)
    x = recipe.generate(batch, Draws.from_generator(gen), grad=True)
    loss, metrics = recipe.student_loss(x, batch, gen)
    loss.backward()
    assert all(g is None for g in _grads(critic)), "the student loss must not reach the critic (GAN term included)"
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(student))
    assert "loss/gan_generator" in metrics
    for p in student.values():
        p.grad = None
    recipe.critic_loss(recipe.generate(batch, Draws.from_generator(gen), grad=False), batch, gen).backward()
    assert all(g is None for g in _grads(student)), "the critic loss must not reach the student"
    assert all(g is not None for g in _grads(critic))
    frozen = [p for n, p in teacher.net.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad or p.grad is not None for p in frozen)


def test_teacher_never_changes_and_only_lora_trains(teacher_dir: Path, tmp_path: Path):
    trainer, recipe, teacher = make(teacher_dir, tmp_path, "train.steps=3", "method.critic_steps_per_student_step=1")
    before = {n: p.detach().clone() for n, p in teacher.net.named_parameters()}
    for _ in range(3):
        trainer.train_iteration()
        trainer.step += 1
    changed = {n for n, p in teacher.net.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any(".critic." in n for n in changed) and any(".default." in n for n in changed)


def _adam_steps(trainer: Trainer, role: str) -> int:
    states = trainer.optimizers[role].state.values()
    return int(next(iter(states))["step"]) if states else 0


def test_ttur_counting_and_resume_mid_cycle(teacher_dir: Path, tmp_path: Path):
    full = tmp_path / "full"
    run(argv(teacher_dir, full, "train.steps=7", "train.checkpoint_every=4", "train.keep_checkpoints=3",
             "method.critic_steps_per_student_step=3"))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/student" in r] == [1, 4, 7]      # iterations 0, 3, 6
    assert all("loss/critic" in r for r in rows)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full / "checkpoints" / "step-0000004", part / "checkpoints" / "step-0000004")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    run(argv(teacher_dir, part, "train.steps=7", "train.checkpoint_every=4", "resume=latest",
             "method.critic_steps_per_student_step=3"))
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed if "loss/student" in r] == [7]
    for a, b in zip(rows[4:], resumed):
        assert a["step"] == b["step"]
        assert a["loss/critic"] == pytest.approx(b["loss/critic"], rel=1e-5)
    trainer, _, _ = make(teacher_dir, tmp_path / "count", "method.critic_steps_per_student_step=3")
    trainer.restore(full / "checkpoints" / "step-0000007")
    assert _adam_steps(trainer, "student") == 3 and _adam_steps(trainer, "critic") == 7


def test_backward_simulation_input_is_the_inference_state(teacher_dir: Path, tmp_path: Path):
    """With k hops, the student's input equals the inference loop's state after k steps (same noise draws)."""
    trainer, recipe, teacher = make(teacher_dir, tmp_path)
    batch = trainer.batch(0)
    seen = {}
    original = recipe.student

    def spy(x, t, cond):
        seen["x"], seen["t"] = x.clone(), t.clone()
        return original(x, t, cond)

    recipe.student = spy
    gen = torch.Generator().manual_seed(5)      # draws k = 3: three simulated hops
    state = gen.get_state()
    with torch.no_grad():
        recipe.generate(batch, Draws.from_generator(gen), grad=False)
    k = int(torch.randint(0, 4, (1,), generator=torch.Generator().set_state(state)))
    assert k == 3
    gen = torch.Generator().set_state(state)
    torch.randint(0, 4, (1,), generator=gen)
    x = torch.randn(seen["x"].shape, generator=gen)
    for j in range(k):
        t, t_next = recipe.times[j].expand(len(x)), recipe.times[j + 1].expand(len(x))
        x0 = original(x, t, batch.cond)
        a, s = (v.view(-1, 1, 1, 1) for v in recipe.schedule.alpha_sigma(t_next))
        x = a * x0 + s * torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(seen["x"], x)
    torch.testing.assert_close(seen["t"].double(), recipe.times[k].expand(len(x)))


@pytest.mark.parametrize("family", ["sdxl", "sd3", pytest.param("flux", marks=pytest.mark.slow)])   # flux: 30 s
def test_three_steps_per_family_and_export(family: str, tmp_path: Path):
    import tiny_pipelines

    from fewstep.export import load_export

    teacher = tmp_path / family
    getattr(tiny_pipelines, f"tiny_{family}")().save_pretrained(str(teacher), safe_serialization=True)
    out = tmp_path / "run"
    run(argv(teacher, out, "train.steps=3", "data.batch_size=2", "method.critic_steps_per_student_step=2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/"))
    bundle, spec, meta = load_export(out / "export")
    assert meta["recipe"] == "dmd2" and meta["family"] == family and len(spec.times) == 5


def test_dmd_one_step_with_teacher_pairs(teacher_dir: Path, tmp_path: Path, capsys):
    """recipe=dmd: `fewstep pairs` caches teacher ODE pairs; the one-step student regresses onto them."""
    from fewstep.cli import main
    from fewstep.pairs import load_pairs

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na tree\n")
    main(["pairs", str(teacher_dir), "--out", str(tmp_path / "pairs"), "--num", "6", "--steps", "4",
          "--prompts", str(prompts), "--batch-size", "4"])
    noise, target, names = load_pairs(str(tmp_path / "pairs"))
    assert noise.shape == target.shape and len(names) == 6 and not torch.equal(noise, target)
    base = ["recipe=dmd", f"teacher.pretrained={teacher_dir}", "data.batch_size=2", "train.progress=false",
            "sample.grid_size=2", "student.lora.rank=4", "method.critic_rank=4", "train.log_every=1",
            "student.mode=lora", "method.critic_mode=lora"]
    with pytest.raises(SystemExit) as info:
        main(["distill", *base, f"output_dir={tmp_path / 'bad'}"])
    assert info.value.code == 2 and "needs method.pairs_path" in capsys.readouterr().err
    out = tmp_path / "dmd"
    run([*base, f"output_dir={out}", "train.steps=2", f"method.pairs_path={tmp_path / 'pairs'}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/student" in r and "loss/regression" in r and "loss/critic" in r for r in rows)
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert meta["timesteps"] == [999] and meta["num_inference_steps"] == 1


# -- decoupled guidance (algorithms.md §7.1) --------------------------------------------------------------------

def _latents(recipe, batch, seed: int = 0) -> torch.Tensor:
    return torch.randn((len(batch.prompts), *recipe.shape), generator=torch.Generator().manual_seed(seed))


def test_decoupled_with_both_weights_zero_gives_an_exactly_zero_direction(teacher_dir: Path, tmp_path: Path):
    trainer, recipe, _ = make(teacher_dir, tmp_path, "method.decoupled=true", "method.ca_weight=0", "method.dm_weight=0")
    batch = trainer.batch(0)
    x = _latents(recipe, batch)
    assert torch.equal(recipe.direction(x, batch, torch.Generator().manual_seed(3)), torch.zeros_like(x))


@pytest.mark.parametrize("critic_mode", ["lora", "full"])
def test_decoupled_ca_term_ignores_the_critic_and_dm_term_uses_it(teacher_dir: Path, tmp_path: Path, critic_mode: str):
    """CA only (dm_weight=0) depends on the teacher alone: perturbing the critic leaves the direction bit-identical
    under the same generator seed; DM only (ca_weight=0) must move with the critic."""
    for name, weights, depends in (("ca", ("method.dm_weight=0",), False), ("dm", ("method.ca_weight=0",), True)):
        trainer, recipe, _ = make(teacher_dir, tmp_path / name, "method.decoupled=true", "method.real_guidance=3",
                                  f"method.critic_mode={critic_mode}", *weights)
        batch = trainer.batch(0)
        x = _latents(recipe, batch)
        before = recipe.direction(x, batch, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in recipe.parameters("critic").values():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        after = recipe.direction(x, batch, torch.Generator().manual_seed(3))
        assert torch.isfinite(before).all() and torch.isfinite(after).all()
        if depends:          # an untrained critic equals the conditional teacher: DM starts at exactly 0
            assert (before - after).abs().max() > 1e-4, name
        else:
            assert before.abs().max() > 1e-4 and torch.equal(before, after), name


def test_decoupled_three_steps_finite_and_export(teacher_dir: Path, tmp_path: Path):
    from fewstep.export import load_export

    out = tmp_path / "run"
    run(argv(teacher_dir, out, "method.decoupled=true", "method.ca_weight=0.5", "method.dm_weight=1",
             "train.steps=3", "method.critic_steps_per_student_step=1"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("loss/student" in r and "loss/critic" in r for r in rows)
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/"))
    _, spec, meta = load_export(out / "export")
    assert meta["recipe"] == "dmd2" and len(spec.times) == 5 and (out / "export" / "fewstep.json").is_file()


def test_adapters_on_a_half_precision_base_train_in_float32():
    """Student and critic LoRA on a bf16/fp16 teacher are float32 (Adam on half-precision adapters went NaN on an
    fp16 SD1.5 teacher); the frozen base keeps its dtype and the forward still returns it."""
    from tiny_pipelines import tiny_sd

    from fewstep.models.adapters import add_named_adapter
    from fewstep.models.student import add_lora

    net = tiny_sd().unet.to(torch.bfloat16)
    add_lora(net, 4, 4, ["to_q", "to_k", "to_v"])
    critic = add_named_adapter(net, "critic", 4, 4, ["to_q", "to_k", "to_v"])
    adapters = {n: p for n, p in net.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert critic and all(p.requires_grad and p.dtype == torch.float32 for p in critic.values())
    assert all(p.dtype == torch.bfloat16 for n, p in net.named_parameters() if "lora_" not in n)
    out = net(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([10]),
              encoder_hidden_states=torch.randn(1, 4, 16, dtype=torch.bfloat16)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
