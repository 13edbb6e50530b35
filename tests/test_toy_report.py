"""The toy quality benchmark's reward columns (issue 14's benchmark): each reward's mean over a row's images, in
the table and the JSON, equal to scoring the same images directly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.data.digits import class_balanced_prompts
from fewstep.metrics.rewards import build_reward
from fewstep.metrics.tilt import rejection_sample, tilt_accept_prob
from fewstep.metrics.toy_report import main, mean_rewards, tilted_images


def test_reward_columns_are_the_rewards_means(tmp_path: Path):
    results = tmp_path / "results.md"
    rows = main(["--teacher", "toy-digits", "--teacher-steps", "2", "--teacher-guidance", "2,1", "-n", "30",
                 "--results", str(results), "--grids", "", "--section", "t", "--rewards", "digits-class,micro-clip"])
    assert torch.is_grad_enabled()   # main's no_grad is scoped: later tests in this process still train
    text = results.read_text()
    assert "| digits-class ↑ | micro-clip ↑ |" in text and "Reward columns" in text
    assert [list(r.rewards) for r in rows] == [["digits-class", "micro-clip"]] * 2
    assert json.loads(results.with_suffix(".json").read_text())["t"][0]["rewards"] == rows[0].rewards
    for r in rows:
        assert f"| {r.rewards['digits-class']:.3f} | {r.rewards['micro-clip']:.3f} |" in text
        assert r.rewards["digits-class"] <= 0          # a log-probability
    # guidance 2 and 1 give other images, so other means: the columns are per row, not one number repeated
    assert rows[0].rewards["digits-class"] != rows[1].rewards["digits-class"]


def test_mean_rewards_batches_like_one_call():
    torch.manual_seed(0)
    images, prompts = torch.rand(7, 3, 16, 16), class_balanced_prompts(7)
    reward = build_reward("digits-class")
    want = float(reward(images, prompts).mean())
    assert mean_rewards(images, prompts, {"d": reward}, batch_size=3)["d"] == pytest.approx(want, rel=1e-6)


def test_update_rescores_named_rows_and_keeps_the_others(tmp_path: Path, capsys):
    """--update replaces the rows it scores (same name, same place), keeps the rest from results.json, and the
    first line names both commands; a section scored at another N is refused in one line, exit 2."""
    results = tmp_path / "results.md"
    base = ["--teacher", "toy-digits", "-n", "20", "--results", str(results), "--grids", "", "--section", "t"]
    first = main(base + ["--teacher-steps", "2,1", "--teacher-guidance", "2"])
    stored = json.loads(results.with_suffix(".json").read_text())["t"]
    stored[1]["fid"] = 123.0   # mark the 1-step row: --update below must keep it and replace the 2-step row
    stored[0]["fid"] = 456.0
    results.with_suffix(".json").write_text(json.dumps({"t": stored}))
    rows = main(base + ["--teacher-steps", "2,3", "--teacher-guidance", "2", "--update"])
    assert [r.name for r in rows] == [first[0].name, first[1].name, "teacher DDIM 3 steps, w=2"]
    assert rows[0].fid == pytest.approx(first[0].fid) and rows[1].fid == 123.0   # re-scored / kept
    text = results.read_text()
    assert "| 123.00 |" in text and "| 456.00 |" not in text
    line = text.split("<!-- BEGIN t -->\n")[1].splitlines()[0]
    assert line.count("python scripts/toy_benchmark.py") == 2 and "--teacher-steps 2,1 " in line
    assert "rows teacher DDIM 2 steps, w=2, teacher DDIM 3 steps, w=2 re-scored by" in line
    with pytest.raises(SystemExit) as e:
        main(["--teacher", "toy-digits", "-n", "10", "--results", str(results), "--grids", "", "--section", "t",
              "--teacher-steps", "1", "--update"])
    assert e.value.code == 2 and "other -n or --rewards" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--section", "none", "--update"])
    assert e.value.code == 2 and "write it once without --update" in capsys.readouterr().err
    rows = main(base + ["--teacher-steps", "", "--update", "--drop", first[1].name])
    assert [r.name for r in rows] == [first[0].name, "teacher DDIM 3 steps, w=2"]
    assert f"; rows {first[1].name} dropped by" in results.read_text() and "| 123.00 |" not in results.read_text()
    with pytest.raises(SystemExit) as e:
        main(base + ["--teacher-steps", "", "--update", "--drop", "no such row"])
    assert e.value.code == 2 and "has no row 'no such row'" in capsys.readouterr().err


def test_tilt_accept_prob_is_the_bounded_exponential():
    r = torch.tensor([0.0, -0.5, -2.0])
    assert torch.allclose(tilt_accept_prob(r, 0.5, 0.0), torch.exp(r.double() / 0.5))
    with pytest.raises(ValueError, match="beta must be > 0"):
        tilt_accept_prob(r, 0.0, 0.0)
    with pytest.raises(ValueError, match="exceeds its stated upper bound"):
        tilt_accept_prob(torch.tensor([0.1]), 1.0, 0.0)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_rejection_sample_draws_the_tilted_gaussian(beta: float):
    """N(0, 1) tilted by exp(-x^2 / beta) is N(0, beta / (beta + 2)): the sampler's variance matches it, and a
    second call gives the same draws (slot i, round k always proposes seed i + k * n)."""
    n = 4000

    def propose(slots, seeds):
        x = torch.stack([torch.randn((), generator=torch.Generator().manual_seed(10_000_000 + s)) for s in seeds])
        return x, -x ** 2

    x = rejection_sample(propose, n, beta, 0.0, seed=0)
    want = beta / (beta + 2)
    assert x.var().item() == pytest.approx(want, rel=0.06)   # SE of a variance at n = 4000: 2.2 %
    assert abs(x.mean().item()) < 4 * (want / n) ** 0.5
    assert torch.equal(rejection_sample(propose, n, beta, 0.0, seed=0), x)   # keyed by seed: reproducible
    with pytest.raises(ValueError, match="use a larger beta"):
        rejection_sample(propose, 5, 1e-4, 0.0, seed=0, max_rounds=1)


def test_tilted_rows_raise_the_reward(tmp_path: Path):
    """--tilt-beta adds rows of the tilted teacher, named by reward and beta, whose digits-class mean is above the
    untilted teacher's at the same steps and CFG; a reward without a known maximum is refused."""
    results = tmp_path / "results.md"
    rows = main(["--teacher", "toy-digits", "--teacher-steps", "2", "--teacher-guidance", "1", "-n", "30",
                 "--results", str(results), "--grids", "", "--section", "t", "--rewards", "digits-class",
                 "--tilt-beta", "2,0.5"])
    assert [r.name for r in rows[1:]] == [f"teacher DDIM 2 steps, w=1, tilted by digits-class at beta={b}"
                                          for b in ("2", "0.5")]
    plain, b2, b05 = (r.rewards["digits-class"] for r in rows)
    assert plain < b2 <= b05   # 2 steps, n = 30: -2.75, -0.16, -0.05 when written
    assert "tilted by digits-class at beta=0.5" in results.read_text()
    with pytest.raises(ValueError, match="known maximum"):
        tilted_images(None, None, build_reward("micro-clip"), 1.0, ["a handwritten digit 1"], 0)


@pytest.mark.parametrize("flags,message", [(["--tilt-beta", "1,0"], "temperatures > 0"),
                                           (["--tilt-beta", "1", "--tilt-reward", "micro-clip"], "known maximum"),
                                           (["--tilt-student", "s=runs/x/export"], "give --tilt-beta"),
                                           (["--student", "s=no/such/export"], "no export folder")])
def test_bad_flags_fail_in_one_line_before_generating(tmp_path: Path, capsys, flags, message):
    results = tmp_path / "results.md"
    with pytest.raises(SystemExit) as e:
        main(["--teacher", "toy-digits", "--teacher-steps", "2", "-n", "10", "--results", str(results), "--grids",
              "", "--section", "t"] + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not results.exists()


def test_rows_carry_the_mlp_witness(tmp_path: Path):
    """Accuracy and diversity under the MLP (the classifier digits-class does not use) are the MLP's score_digits of
    the same images, printed next to the CNN's; rows stored before those columns existed print a dash."""
    from fewstep.metrics.digits import default_mlp, mlp_reference, score_digits
    from fewstep.metrics.toy_report import InferenceSpec, Row, generate_images, load_teacher, markdown

    results = tmp_path / "results.md"
    (row,) = main(["--teacher", "toy-digits", "--teacher-steps", "3", "--teacher-guidance", "1", "-n", "20",
                   "--results", str(results), "--grids", "", "--section", "t"])
    teacher = load_teacher("toy-digits")
    spec = InferenceSpec([float(t) for t in teacher.teacher_times(3)], "ddim", 1.0)
    prompts = class_balanced_prompts(20)
    with torch.no_grad():
        images = generate_images(teacher, spec.wrap(teacher.denoiser()), teacher.net, prompts, list(range(20)),
                                 torch.tensor(spec.times, dtype=torch.float64), spec.step, 1.0, batch_size=250)
    mlp = score_digits(images, [int(p[-1]) for p in prompts], model=default_mlp(), reference=mlp_reference())
    assert row.accuracy_mlp == pytest.approx(mlp.class_accuracy) and row.diversity_mlp == pytest.approx(mlp.diversity)
    assert row.fid_mlp == pytest.approx(mlp.fid, rel=1e-5)
    assert f"| {row.accuracy:.3f} / {row.accuracy_mlp:.3f} | {row.diversity:.2f} / {row.diversity_mlp:.2f} |" in \
        results.read_text()
    old = Row("old", 4, 1.0, 1.0, 0.9, 1.0, 0.001, 20)
    assert "| 0.900 / – | 1.00 / – |" in markdown([old], "x", 20)


def test_accept_uniforms_are_not_the_proposals_noise():
    """The acceptance uniform of seed s is not the first value of torch's stream for s (which drives the proposal's
    noise), and over many seeds the two are uncorrelated."""
    from fewstep.metrics.tilt import accept_uniform

    u = torch.tensor([accept_uniform(s) for s in range(2000)])
    first = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(s)) for s in range(2000)])
    assert not torch.allclose(u.float(), first)
    assert abs(torch.corrcoef(torch.stack([u.float(), first]))[0, 1].item()) < 0.1
    assert 0.45 < u.mean().item() < 0.55


def test_student_labels_and_paths_may_hold_equals_signs(tmp_path: Path):
    """--student LABEL=EXPORT_DIR splits where an export folder follows, so "K = 8" labels and "lr=3e-4" paths
    both parse."""
    from fewstep.metrics.toy_report import parse_student
    from fewstep.paths import SIDECAR

    for run in ("a", "lr=3e-4"):
        (tmp_path / run / "export").mkdir(parents=True)
        (tmp_path / run / "export" / SIDECAR).write_text("{}")
    assert parse_student(f"KL 1, K = 8 (seed 0)={tmp_path}/a/export") == ("KL 1, K = 8 (seed 0)", tmp_path / "a/export")
    assert parse_student(f"x={tmp_path}/lr=3e-4/export") == ("x", tmp_path / "lr=3e-4/export")


def test_tilted_student_rows_tilt_the_export(tmp_path: Path):
    """--tilt-student draws from an export tilted like the teacher's rows: an export of the teacher itself at the
    teacher's 2 DDIM steps gives the teacher's tilted row, and the tilt raises the reward over the plain export."""
    from fewstep.export import export_student
    from fewstep.metrics.toy_report import load_teacher, teacher_spec

    teacher = load_teacher("toy-digits")
    _, spec = teacher_spec(teacher, 2, 1.0)
    export = export_student(teacher, teacher.net, spec, tmp_path / "export", "dmd2", "toy-digits")
    rows = main(["--teacher", "toy-digits", "--teacher-steps", "2", "--teacher-guidance", "1", "-n", "20",
                 "--results", str(tmp_path / "r.md"), "--grids", "", "--section", "t", "--rewards", "digits-class",
                 "--tilt-beta", "0.5", "--tilt-student", f"self={export}", "--student", f"self={export}"])
    plain_teacher, tilted_teacher, tilted, plain = rows
    assert tilted.name == "self student 2 steps, w=1, tilted by digits-class at beta=0.5"
    assert tilted.rewards == pytest.approx(tilted_teacher.rewards) and tilted.accuracy == tilted_teacher.accuracy
    assert plain.rewards == pytest.approx(plain_teacher.rewards)
    assert tilted.rewards["digits-class"] > plain.rewards["digits-class"]
