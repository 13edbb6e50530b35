"""The command line end to end (subprocesses, as a user runs it) and its bad-input contract: one line on stderr,
exit code 2, no traceback, nothing earlier overwritten."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def common(teacher: Path, out: Path) -> list[str]:
    return [f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=2", "sample.grid_size=2",
            "train.progress=false", "student.lora.rank=2", "student.lora.alpha=2", "method.num_ddim_timesteps=10",
            "student.mode=lora"]


def test_accelerate_launch_distill_then_sample(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts" / "distill.py"), "recipe=lcm", "train.steps=2", *common(teacher_dir, out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "export" / "fewstep.json").is_file()
    samples = tmp_path / "samples"
    done = subprocess.run([sys.executable, "-m", "fewstep.cli", "sample", str(out / "export"), "--out", str(samples),
                           "--num-images", "3", "--prompts", str(_prompts(tmp_path, "a cat\na dog\n"))],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert [r["prompt"] for r in rows] == ["a cat", "a dog", "a cat"]
    assert [r["seed"] for r in rows] == [0, 1, 2] and {r["steps"] for r in rows} == {4}
    assert all((samples / r["file"]).is_file() for r in rows)


def test_bad_input_in_a_subprocess_is_one_line_exit_2(tmp_path: Path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), "recipe=nope"], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unknown recipe 'nope'; choose one of" in lines[0]


def _prompts(tmp: Path, text: str) -> Path:
    p = tmp / "prompts.txt"
    p.write_text(text)
    return p


def _expect_exit_2(capsys, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and needle in err[-1], err


def test_bad_inputs_exit_2(capsys, teacher_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["distill", "recipe=lcm"]
    _expect_exit_2(capsys, base + ["train.stepz=1"], "unknown config key 'train.stepz'")
    _expect_exit_2(capsys, base + ["train.steps=abc"], "bad value for 'train.steps'")
    _expect_exit_2(capsys, base + ["model=sd9"], "unknown model 'sd9'")
    _expect_exit_2(capsys, base + ["teacher.pretrained=/no/such/folder"], "does not exist")
    _expect_exit_2(capsys, base + ["teacher.pretrained=someorg/some-model", f"output_dir={tmp_path / 'h'}"],
                   "looks like a hub id but HF_HUB_OFFLINE=1")
    empty = _prompts(tmp_path, "\n")
    _expect_exit_2(capsys, base + common(teacher_dir, tmp_path / "e") + ["data.source=prompts", f"data.path={empty}"],
                   "is empty; put one prompt per line")
    _expect_exit_2(capsys, ["sample", str(teacher_dir), "--out", str(tmp_path / "s"), "--prompts", str(empty)],
                   "is empty")


def test_corrupt_checkpoint_on_resume_exits_2_and_keeps_files(capsys, teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "c"
    main(["distill", "recipe=lcm", "train.steps=1", *common(teacher_dir, out)])
    capsys.readouterr()
    weights = out / "checkpoints" / "step-0000001" / "trainable-student.safetensors"
    weights.write_bytes(b"garbage")
    export = (out / "export" / "pytorch_lora_weights.safetensors").read_bytes()
    _expect_exit_2(capsys, ["distill", "recipe=lcm", "train.steps=2", "resume=latest", *common(teacher_dir, out)],
                   "is damaged")
    assert weights.read_bytes() == b"garbage"
    assert (out / "export" / "pytorch_lora_weights.safetensors").read_bytes() == export
