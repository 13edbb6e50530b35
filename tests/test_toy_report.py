"""The toy quality benchmark's reward columns (issue 14's benchmark): each reward's mean over a row's images, in
the table and the JSON, equal to scoring the same images directly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.data.digits import class_balanced_prompts
from fewstep.metrics.rewards import build_reward
from fewstep.metrics.toy_report import main, mean_rewards


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
