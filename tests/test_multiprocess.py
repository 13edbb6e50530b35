"""Data-parallel training through `accelerate launch --num_processes 2` on the CPU (gloo): each process draws its
own shard of every batch, gradients are averaged, and the trainer checks at every save that the replicas still
hold identical weights (it raises otherwise, so an unsynchronised step fails this test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_two_process_run_keeps_replicas_in_sync_and_logs_once(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts" / "distill.py"), "recipe=lcm", "train.steps=3", "train.log_every=1",
           "train.checkpoint_every=1", "train.sample_every=0", "train.progress=false",
           f"teacher.pretrained={teacher_dir}", f"output_dir={out}", "data.batch_size=2", "sample.grid_size=2",
           "student.mode=lora", "student.lora.rank=2", "student.lora.alpha=2", "method.num_ddim_timesteps=10"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]          # written by the main process only
    assert all(r["loss/student"] == r["loss/student"] for r in rows)   # finite (not NaN)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-0000003"
    assert (out / "export" / "fewstep.json").is_file()
