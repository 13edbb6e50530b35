"""Data-parallel training through `accelerate launch --num_processes 2` on the CPU (gloo): each process draws its
own shard of every batch, gradients are averaged, and the trainer checks at every save that the replicas still
hold identical weights (it raises otherwise, so an unsynchronised step fails this test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipelines import free_port

ROOT = Path(__file__).resolve().parent.parent
# `accelerate launch --cpu` always starts one process; two CPU processes need the torchrun launcher
# (--multi_gpu) with ACCELERATE_USE_CPU, which makes Accelerator() pick the gloo MULTI_CPU backend.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def test_two_process_run_keeps_replicas_in_sync_and_logs_once(teacher_dir: Path, tmp_path: Path):
    """Also checks that two processes really ran: each prints its rank at start-up."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(ROOT / "scripts" / "distill.py"), "recipe=lcm", "train.steps=3", "train.log_every=1",
           "train.checkpoint_every=1", "train.sample_every=0", "train.progress=false",
           f"teacher.pretrained={teacher_dir}", f"output_dir={out}", "data.batch_size=2", "sample.grid_size=2",
           "student.mode=lora", "student.lora.rank=2", "student.lora.alpha=2", "method.num_ddim_timesteps=10"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2" in done.stdout + done.stderr and "process 1 of 2" in done.stdout + done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]          # written by the main process only
    assert all(r["loss/student"] == r["loss/student"] for r in rows)   # finite (not NaN)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-0000003"
    assert (out / "export" / "fewstep.json").is_file()


def test_two_process_eval_shards_prompts_and_matches_one_process(tmp_path: Path):
    from fewstep.cli import main

    args = ["eval", "toy-digits", "--protocol", "toy-digits", "--steps", "2", "--num-images", "20", "--no-progress"]
    main([*args, "--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), "-m", "fewstep.cli",
           *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["env"]["processes"] == 2 and one["env"]["processes"] == 1
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for k in a["metrics"]:
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-6), k   # summation order
