"""DeepSpeed ZeRO-2 and ZeRO-3 (issue 12) on 2 CPU processes: `fewstep distill` with the ZeRO settings of
recipes/accelerate/deepspeed-zero2.yaml and deepspeed-zero3.yaml (tests/fsdp2_cpu_train.py --engine zero2-run,
zero3-run) matches the 1-process run, and each process checkpoints its own partition of the fp32 weights and
optimizer states in the flat layout FSDP2 uses (fewstep.train.shards), nothing gathered; those checkpoints resume
on any world size with or without DeepSpeed, and under FSDP2; a non-finite run
is skipped and stopped as without it; a full student's EMA and LCM's target network (both read ZeRO-3's
partitioned weights) export what the 1-process run exports. DeepSpeed is not a dependency: the
file is skipped where it is not installed (`pip install --no-build-isolation deepspeed`, which builds against the
installed torch; 0.19.8 here, its CPU accelerator with gloo)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_world_size import ENV, LAUNCH, RECIPES, ROOT, _lora_export, final_weights, resume_copy
from tiny_pipelines import free_port

pytest.importorskip("deepspeed")

# LoRA LCM (the one-role recipe DeepSpeed runs), 4 steps with a warm-up, so the schedule's position matters
LCM = [*RECIPES["lcm"], "train.steps=4", "train.lr=1e-3", "train.warmup_steps=3", "train.log_every=1",
       "train.sample_every=2", "train.checkpoint_every=2", "sample.grid_size=2", "train.progress=false"]
STAGES = pytest.mark.parametrize("stage", [2, 3])


def zero(stage: int, teacher: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    harness = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), "unused", "--engine", f"zero{stage}-run"]
    cmd = [*LAUNCH, "--main_process_port", free_port(), *harness, *LCM, f"teacher.pretrained={teacher}",
           f"output_dir={out}", "data.batch_size=2", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)


def single(teacher: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "distill.py"), *LCM, f"teacher.pretrained={teacher}",
           f"output_dir={out}", "data.batch_size=4", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss/student"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@STAGES
def test_zero_matches_one_process_and_its_checkpoints_resume_anywhere(stage: int, teacher_dir: Path,
                                                                     tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := single(teacher_dir, one)).returncode == 0, done.stderr[-3000:]
    assert (done := zero(stage, teacher_dir, two)).returncode == 0, done.stderr[-3000:]
    assert "(DEEPSPEED" in done.stdout + done.stderr, "the harness must have run DeepSpeed"
    if stage == 3:
        assert re.search(r"ZeRO-3 partitioned (\d+) of \1 trained parameters", done.stdout), done.stdout[-2000:]
    assert sorted(p.name for p in (two / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    # measured: relative loss differences up to 5.1e-7, max |weight difference| 1.1e-6 (the tolerances of the
    # DDP world-size test, tests/test_world_size.py)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-6)
    reference, got = final_weights(one), final_weights(two)
    assert reference.keys() == got.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=2e-5, msg=k)
    export = _lora_export(one)
    assert any(v.abs().max() > 1e-5 for k, v in export.items() if "lora_B" in k or "lora.up" in k), "vacuous"

    def close_to_reference(out: Path) -> None:
        got = _lora_export(out)
        assert got.keys() == export.keys()
        for k in export:   # measured: max |difference| 1.1e-6
            torch.testing.assert_close(got[k], export[k], rtol=1e-3, atol=2e-5, msg=k)

    close_to_reference(two)
    # each process wrote its own part of every trained tensor: two files whose trained elements add up to the
    # role's, each holding less than all of them
    ck = two / "checkpoints" / "step-0000002"
    assert not list(ck.glob("trainable-*.safetensors")) and not list(ck.rglob("*.distcp"))
    files = sorted((ck / "shards").glob("*.safetensors"))
    per_file = [sum(t.numel() for k, t in load_file(f).items() if k.startswith("trainable.")) for f in files]
    total = sum(t.numel() for t in got.values())
    assert len(files) == 2 and sum(per_file) == total and max(per_file) < total, (per_file, total)
    # the ZeRO run's step-2 checkpoint, resumed by 1 process without DeepSpeed and by 2 ZeRO processes; a
    # checkpoint resumed without the optimizer states it holds ends 2.5e-3 away (measured), far outside the bound
    on_one = resume_copy(two, tmp_path / "on-one")
    assert (done := single(teacher_dir, on_one, "resume=latest")).returncode == 0, done.stderr[-3000:]
    on_two = resume_copy(two, tmp_path / "on-two")
    assert (done := zero(stage, teacher_dir, on_two, "resume=latest")).returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    resumed = [on_one, on_two]
    if stage == 3:   # and by 2 FSDP2 processes: the same layout, resharded
        on_fsdp2 = resume_copy(two, tmp_path / "on-fsdp2")
        harness = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), "unused", "--engine", "fsdp2-run"]
        cmd = [*LAUNCH, "--main_process_port", free_port(), *harness, *LCM, f"teacher.pretrained={teacher_dir}",
               f"output_dir={on_fsdp2}", "data.batch_size=2", "resume=latest"]
        done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
        resumed.append(on_fsdp2)
    for out in resumed:
        close_to_reference(out)
    ran, again = final_weights(two), final_weights(on_two)   # an interrupted ZeRO run ends where it would have:
    if stage == 2:                                            # bitwise
        assert all(torch.equal(ran[k], again[k]) for k in ran)
    else:   # deepspeed-zero3.yaml offloads the optimizer: DeepSpeedCPUAdam keeps beta^t as a running float product,
        for k in ran:   # which a resumed run recomputes with pow(beta, t); measured: max |difference| 1.2e-7
            torch.testing.assert_close(again[k], ran[k], rtol=0, atol=1e-6, msg=k)
    # a 1-process checkpoint resumed under ZeRO (its optimizer states scattered into the partitions)
    from_one = resume_copy(one, tmp_path / "from-one")
    assert (done := zero(stage, teacher_dir, from_one, "resume=latest")).returncode == 0, done.stderr[-3000:]
    close_to_reference(from_one)


@STAGES
def test_zero_skips_non_finite_steps_and_stops_in_one_line(stage: int, teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "diverged"
    done = zero(stage, teacher_dir, out, "train.lr=1e4", "train.steps=8", "train.max_nonfinite_steps=3",
                 "train.checkpoint_every=0", "train.sample_every=0")
    assert done.returncode != 0   # each process exits 2 with the line; the launcher reports 1
    assert "error: 3 steps in a row" in done.stderr and "non-finite" in done.stderr, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped/student"] for r in rows] == [0, 0, 1, 1, 1]   # measured: NaN from step 3 at lr 1e4
    assert not (out / "checkpoints").exists() and not (out / "export").exists()


@STAGES
def test_zero_full_student_with_its_ema_and_target_network_matches_one_process(stage: int, teacher_dir: Path,
                                                                               tmp_path: Path):
    """A full LCM student under ZeRO with train.ema_decay and LCM's EMA target network (which follows the
    student's weights, gathered under ZeRO-3): the exported target network equals the 1-process run's."""
    from test_world_size import FSDP2, _exports

    full = [a for a in FSDP2["lcm-full"] if not a.startswith("train.steps")]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := single(teacher_dir, one, *full)).returncode == 0, done.stderr[-3000:]
    assert (done := zero(stage, teacher_dir, two, *full)).returncode == 0, done.stderr[-3000:]
    a, b = _exports(one), _exports(two)
    teacher = load_file(teacher_dir / "unet/diffusion_pytorch_model.safetensors")
    moved_by = max((a[k] - teacher[k.split("/", 2)[-1]]).abs().max().item() for k in a if k.startswith("unet/"))
    assert moved_by > 1e-4, "vacuous: the export did not move off the teacher"
    assert a.keys() == b.keys()
    for k in a:   # the tolerance of the FSDP2 export test (tests/test_world_size.py)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-5, msg=k)


def test_zero3_evaluation_during_training_scores_like_one_process(teacher_dir: Path, tmp_path: Path):
    """`train.eval_every` under ZeRO-3: every forward of the partitioned student gathers its parameters, so both
    processes run the same number of generation batches although 129 images split 65 / 64 (process 1 runs an
    empty round; without it the run hangs until the timeout). The scores equal the 1-process run's."""
    extra = ["train.steps=1", "train.sample_every=0", "train.checkpoint_every=0", "train.eval_every=1",
             "train.eval_num_images=129"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := single(teacher_dir, one, *extra)).returncode == 0, done.stderr[-3000:]
    assert (done := zero(3, teacher_dir, two, *extra)).returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((d / "eval.jsonl").read_text()) for d in (one, two))
    assert a.keys() == b.keys() and "eval/fid[digits-cnn]" in a
    for k in a:   # the FSDP2 test's tolerance (tests/test_world_size.py)
        assert b[k] == pytest.approx(a[k], rel=1e-6), k


@STAGES
def test_zero_bf16_exports_and_checkpoints_the_fp32_masters(stage: int, teacher_dir: Path, tmp_path: Path):
    """Under bf16 mixed precision DeepSpeed holds the module's weights in bf16 and steps fp32 master weights: the
    export and the checkpoints hold the masters (values bf16 cannot represent), the same values in both. An export
    of the module's own copies would be bf16-representable throughout."""
    out = tmp_path / "bf16"
    assert (done := zero(stage, teacher_dir, out, "train.mixed_precision=bf16")).returncode == 0, done.stderr[-3000:]
    exported = torch.cat([v.reshape(-1).float() for v in _lora_export(out).values()])
    masters = torch.cat(list(final_weights(out).values()))   # the step-4 checkpoint: the end of the run
    assert exported.dtype == masters.dtype == torch.float32
    assert (exported != exported.bfloat16().float()).float().mean() > 0.5
    assert torch.equal(exported.sort().values, masters.sort().values)
