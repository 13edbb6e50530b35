"""Crash and fault behaviour (issue 12): a run killed with SIGKILL mid-step or mid-checkpoint and resumed ends with
the weights and the metrics.jsonl of an uninterrupted run, bit for bit; non-finite steps are skipped, counted and,
K in a row, stop the run without saving or exporting; a resume refuses changed training settings and applies the
ones it may change; a failed write leaves the destination as it was."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.distill import run
from fewstep.errors import FewstepError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def dmd2_argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    """DMD2 with a LoRA critic, the student every 2nd step, logs every 3 steps and checkpoints every 2: the
    logging window and the two time-scale cycle both straddle checkpoints."""
    return ["recipe=dmd2", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.progress=false", "student.mode=lora", "method.critic_mode=lora",
            "student.lora.rank=2", "student.lora.alpha=2", "method.critic_rank=2", "method.critic_alpha=2",
            "student.lora.targets=[]", "method.critic_steps_per_student_step=2", "train.steps=6",
            "train.log_every=3", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.sample_every=0",
            *extra]


def distill(argv: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {**ENV, "FEWSTEP_FAULT": fault} if fault else ENV
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("sec_per_step", "peak_rss_mb")} for r in rows]   # measured, not math


def weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return {f"{f.name}/{k}": v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "full"
    done = distill(dmd2_argv(teacher_dir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault", ["step@3", "save@4", "step@5"])
def test_sigkill_then_resume_equals_an_uninterrupted_run_bitwise(fault: str, uninterrupted: Path, teacher_dir: Path,
                                                                 tmp_path: Path):
    out = tmp_path / "run"
    killed = distill(dmd2_argv(teacher_dir, out), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "export").exists()
    resumed = distill(dmd2_argv(teacher_dir, out, "resume=latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert not list((out / "checkpoints").glob(".tmp-*")), "the killed save's temporary folder must be cleaned up"
    a, b = weights(uninterrupted), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(out) == metrics(uninterrupted)
    # the exported tensors too (the file's bytes differ only in peft's metadata, which lists its target-module
    # set in the process's hash order)
    ea, eb = (load_file(d / "export" / "pytorch_lora_weights.safetensors") for d in (uninterrupted, out))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert (out / "export" / "fewstep.json").read_bytes() == (uninterrupted / "export" / "fewstep.json").read_bytes()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(teacher_dir: Path, tmp_path: Path):
    """The probe of issue 12: LCM at train.lr=1e4 goes non-finite within a few steps."""
    out = tmp_path / "nan"
    argv = ["recipe=lcm", f"teacher.pretrained={teacher_dir}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.progress=false", "student.mode=lora", "student.lora.rank=2",
            "student.lora.alpha=2", "method.num_ddim_timesteps=10", "train.steps=40", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.sample_every=0", "train.lr=1e4",
            "train.max_nonfinite_steps=3"]
    with pytest.raises(FewstepError) as err:
        run(argv)
    msg = str(err.value)
    assert "\n" not in msg and "3 steps in a row" in msg and "stopped without saving or exporting" in msg
    rows = metrics(out)
    bad = [r["step"] for r in rows if r["skipped/student"] > 0]
    assert bad == [rows[-1]["step"] - 2, rows[-1]["step"] - 1, rows[-1]["step"]], rows[-4:]
    good = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert f"the last good checkpoint is {good}" in msg
    assert int(good.name[5:]) == bad[0] - 1                       # nothing saved once the steps went non-finite
    assert all(torch.isfinite(v).all() for v in load_file(good / "trainable-student.safetensors").values())
    assert not (out / "export").exists()


def test_resume_refuses_changed_training_settings_and_applies_allowed_ones(teacher_dir: Path, tmp_path: Path,
                                                                          capsys):
    out = tmp_path / "r"
    base = ["recipe=lcm", f"teacher.pretrained={teacher_dir}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.progress=false", "student.mode=lora", "student.lora.rank=2",
            "student.lora.alpha=2", "method.num_ddim_timesteps=10", "train.sample_every=0", "train.log_every=1"]
    run([*base, "train.steps=2"])
    for change, key in (("method.loss=l2", "method.loss"), ("student.lora.alpha=4", "student.lora.alpha"),
                        ("train.betas=[0.5,0.9]", "train.betas")):
        with pytest.raises(FewstepError, match=rf"^resume: {key} is .* but the run was trained with .*start a new "
                                               "output_dir$"):
            run([*base, "train.steps=3", "resume=latest", change])
    with pytest.raises(FewstepError, match=r"^resume: the global batch would be 1 \(data.batch_size=1 x 1 processes x 1 "
                                           r"accumulation\) but the run was trained with 2; set data.batch_size=2"):
        run([*base, "train.steps=3", "resume=latest", "data.batch_size=1"])
    capsys.readouterr()
    run([*base, "train.steps=3", "resume=latest", "train.lr=2e-4"])
    said = capsys.readouterr()
    assert "train.lr: 0.002 -> 0.0002" in said.out + said.err and "train.steps: 2 -> 3" in said.out + said.err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_apply_lr_keeps_the_schedule_position():
    from diffusers.optimization import get_scheduler

    from fewstep.train.trainer import apply_lr

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = opt.param_groups[0]["lr"] / 1e-3
    apply_lr(opt, sched, [4e-3])
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * factor)
    opt.step()
    sched.step()
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    ref = get_scheduler("cosine", fresh, num_warmup_steps=0, num_training_steps=10)
    for _ in range(5):
        fresh.step()
        ref.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(fresh.param_groups[0]["lr"])


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path: Path):
    import errno

    from fewstep.paths import staged_output

    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old.txt").write_text("kept")
    with pytest.raises(FewstepError, match="No space left on device.*left as they were"):
        with staged_output(dest) as tmp:
            (tmp / "new.txt").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (dest / "old.txt").read_text() == "kept"
