"""RTDMD stage 1, AC-DMD (`recipe=rtdmd_cold`; algorithms.md §6.3, §6.7 tests 2-4): the CPS-projection identity,
the consistency estimator, the capped subinterval weight, and the recipe end to end on the flow toy teacher with
its CPS export reproduced by the stock SD3 pipeline (the callback recipe of tests/test_cps.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.diffusion.forward import diffuse  # noqa: E402
from fewstep.diffusion.schedule import RectifiedFlow  # noqa: E402
from fewstep.recipes import losses as L  # noqa: E402
from fewstep.sampling.steps import cps_step  # noqa: E402


QUIET = ["train.progress=false", "train.checkpoint_every=0", "train.sample_every=0", "sample.grid_size=2",
         "train.log_every=1"]   # short recipe runs: no progress bar, checkpoints or sample grids; every step logged


def test_cps_projection_gap_identity():
    """xs_T - xs_F = (v_T - v_F) [s cos(theta) (1 - t) - (1 - s) t] with the same CPS noise: the noise cancels."""
    g = torch.Generator().manual_seed(0)
    x0, eps, z, x0_t, x0_f = (torch.randn(16, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(5))
    t, s, eta = 0.8, 0.35, 0.9
    tb, sb = torch.full((16,), t, dtype=torch.float64), torch.full((16,), s, dtype=torch.float64)
    x_t = diffuse(x0, tb, RectifiedFlow(), eps)
    project = lambda x0hat: cps_step(x_t, x0hat, tb, sb, RectifiedFlow(), noise_fn=lambda *a: z, eta=eta)  # noqa: E731
    v_t, v_f = (x_t - x0_t) / t, (x_t - x0_f) / t                      # flow velocities of the two x0 estimates
    want = (v_t - v_f) * (s * math.cos(eta * math.pi / 2) * (1 - t) - (1 - s) * t)
    torch.testing.assert_close(project(x0_t) - project(x0_f), want, atol=1e-6, rtol=1e-6)


def test_consistency_estimator_is_unbiased():
    """E[(h1 - a)(h2 - a)] = (E h - a)^2 for independent h1, h2 (Monte Carlo)."""
    g = torch.Generator().manual_seed(1)
    mu, a, sd = 0.3, -0.4, 1.5
    h1, h2 = (mu + sd * torch.randn(400_000, generator=g, dtype=torch.float64) for _ in range(2))
    est = L.ambient_consistency(torch.full_like(h1, a), h1, h2)
    assert float(est) == pytest.approx((mu - a) ** 2, abs=0.02)
    same = L.ambient_consistency(torch.full_like(h1, a), h1, h1)   # one sample twice: biased up by its variance
    assert float(same) > (mu - a) ** 2 + sd**2 * 0.9


def test_move_scale_out_weight_identity():
    """clamp(1/b^2, 0, 10) ||b v - b v*||^2 == min(1, 10 b^2) ||v - v*||^2."""
    b = torch.tensor([0.05, 0.2, 0.3162, 0.5, 0.9], dtype=torch.float64)
    v, v_star = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    lhs = torch.clamp(1 / b**2, 0, 10) * ((b[:, None] * v - b[:, None] * v_star) ** 2).mean(1)
    rhs = L.capped_inverse_weight(b, 10.0).double() * ((v - v_star) ** 2).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-9)


def test_bad_settings_are_refused(tmp_path, capsys):
    from fewstep.cli import main

    for recipe, override, message in [("rtdmd_cold", "method.eta=1.5", "method.eta must lie in [0, 1]"),
                                      ("rtdmd_cold", "method.eta=0", "needs method.eta > 0"),
                                      ("rtdmd", "method.kl_weight=-1", "method.kl_weight must be >= 0"),
                                      ("rtdmd", "method.group_size=3", "must be a multiple of method.group_size")]:
        with pytest.raises(SystemExit) as exc:
            main(["distill", f"recipe={recipe}", f"output_dir={tmp_path / 'x'}", override])
        assert exc.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_trains_and_the_stock_pipeline_reproduces_its_cps_export(tmp_path: Path):
    import diffusers
    from test_cps import StockCPS

    from fewstep.distill import run
    from fewstep.export import load_export
    from fewstep.models.teacher import load_pipeline
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    out = tmp_path / "run"
    run(["recipe=rtdmd_cold", "model=toy-digits-sd3", f"output_dir={out}", "train.steps=3", "data.batch_size=2",
         "method.critic_steps_per_student_step=1", "train.lr=1e-2", "train.ema_decay=0", "sample.grid_size=2",
         "train.progress=false", "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=1"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/critic"]) and math.isfinite(r["loss/student"]) for r in rows)
    assert {r["rollout_steps"] for r in rows} <= {1.0, 2.0, 3.0, 4.0}
    export = out / "export"
    meta = json.loads((export / "fewstep.json").read_text())
    assert meta["recipe"] == "rtdmd_cold" and meta["step"] == "cps:eta=0.9" and meta["step_options"] == {"eta": 0.9}
    bundle, spec, _ = load_export(export)
    prompts, seeds = ["a handwritten digit 3", "a handwritten digit 7"], [11, 12]
    grid = torch.tensor(spec.times, dtype=torch.float64)
    ours = generate_latents(bundle, bundle.denoiser(), bundle.net, prompts, seeds, grid, spec.step, 1.0)
    pipe = load_pipeline(str(export))
    pipe.scheduler = getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])
    teacher = load_pipeline("toy-digits-sd3")
    teacher.scheduler = pipe.scheduler
    stock, base = [], []
    for prompt, seed in zip(prompts, seeds):
        for p, dest in ((pipe, stock), (teacher, base)):
            gen = seed_generators([seed])[0]
            latents = initial_noise((1, 4, 8, 8), [gen])
            dest.append(p(prompt, latents=latents, output_type="latent", **meta["pipeline_kwargs"],
                          callback_on_step_end=StockCPS(latents, gen, meta["step_options"]["eta"], True)).images)
    torch.testing.assert_close(ours, torch.cat(stock), atol=1e-4, rtol=1e-4)
    assert (torch.cat(stock) - torch.cat(base)).abs().max() > 1e-2   # the student moved off the teacher


@pytest.mark.parametrize("stage1_mode", ["full", "lora"])
def test_stage_two_trains_from_a_stage_one_export(stage1_mode: str, tmp_path: Path):
    """recipe=rtdmd from a (1-step) stage-1 export, full or LoRA (fused into the teacher when loaded): the rollout's
    rewards give advantages, PPO, the AC-DMD auxiliary term and reward backprop all train the fresh LoRA, and the
    export samples with CPS on top of the stage-1 network."""
    from fewstep.distill import run
    from fewstep.export import load_export
    from fewstep.models.teacher import load_teacher

    stage1 = tmp_path / "stage1"
    lora = ["method.critic_mode=lora", "student.lora.init_scale=0.3"] if stage1_mode == "lora" else []
    run(["recipe=rtdmd_cold", "model=toy-digits-sd3", f"output_dir={stage1}", "train.steps=1", "data.batch_size=2",
         "train.ema_decay=0", "train.lr=1e-2", f"student.mode={stage1_mode}", *lora, *QUIET])
    base = load_teacher(str(stage1 / "export")).net
    original = load_teacher("toy-digits-sd3").net
    assert not hasattr(base, "peft_config") or not base.peft_config        # fused, no adapter layers left
    assert max(float((a - b).abs().max()) for a, b in zip(base.parameters(), original.parameters())) > 1e-3
    out = tmp_path / "stage2"
    run(["recipe=rtdmd", "model=toy-digits-sd3", f"teacher.pretrained={stage1 / 'export'}", f"output_dir={out}",
         "train.steps=2", "data.batch_size=4", "method.group_size=2", "student.lora.init_scale=0.3", *QUIET])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/student", "loss/critic", "loss/ppo", "loss/aux", "loss/bp"))
        assert r["reward/digits-class"] <= 0 and r["advantage_abs"] > 0
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert meta["recipe"] == "rtdmd" and meta["step"] == "cps:eta=0.9" and meta["lora"] is not None
    stage1_times = json.loads((stage1 / "export" / "fewstep.json").read_text())["times"]
    assert meta["times"] == stage1_times                # stage 2 trains on stage 1's (shifted) grid
    assert meta["teacher"].endswith("stage1/export")     # the stage-2 LoRA loads onto the stage-1 pipeline
    student, _, _ = load_export(out / "export")
    assert student.family.name == "sd3" and student.latent_shape() == (4, 8, 8)


def test_stage_two_kl_is_measured_against_the_stage_one_network(tmp_path: Path):
    """method.kl_weight: the KL's reference is the stage-1 network (not the original teacher, which differs from it
    here), so before the first update the student, a zero-initialised LoRA on it or a full copy of it, is at KL 0
    exactly; one update later it is not."""
    from fewstep.distill import run

    stage1 = tmp_path / "stage1"
    run(["recipe=rtdmd_cold", "model=toy-digits-sd3", f"output_dir={stage1}", "train.steps=1", "data.batch_size=2",
         "train.ema_decay=0", "train.lr=1e-2", *QUIET])
    for mode in ("lora", "full"):
        out = tmp_path / mode
        run(["recipe=rtdmd", "model=toy-digits-sd3", f"teacher.pretrained={stage1 / 'export'}", f"output_dir={out}",
             "train.steps=2", "data.batch_size=4", "method.group_size=2", f"student.mode={mode}", "train.lr=1e-3",
             "method.kl_weight=1", "student.lora.init_scale=0", *QUIET])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["loss/kl"] == 0.0 and rows[1]["loss/kl"] > 0, (mode, rows)


def test_stage_two_refuses_a_real_teacher_of_another_kind(tmp_path: Path, capsys):
    from fewstep.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "recipe=rtdmd", "model=toy-digits-sd3", "teacher.pretrained=toy-digits-sd3",
              "method.real_teacher_path=toy-digits", f"output_dir={tmp_path / 'x'}", "train.progress=false"])
    assert exc.value.code == 2
    assert "point method.real_teacher_path at the original teacher" in capsys.readouterr().err
