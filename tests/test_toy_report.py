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
