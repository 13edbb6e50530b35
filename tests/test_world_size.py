"""World-size invariance (issue 12): every random draw is keyed by the sample's global position and the step, and
gradients are averaged by accelerate's DDP, so 2 CPU processes (gloo) with `data.batch_size=B/2` each run the same
math as 1 process with B. The losses in metrics.jsonl and the final trained weights must agree to within the
rounding of a different reduction order (the tolerances below are a margin over what was measured: see the note
on each)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipelines import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

RECIPES = {
    # LoRA student; 3 steps
    "lcm": ["recipe=lcm", "train.steps=3", "student.mode=lora", "student.lora.rank=2", "student.lora.alpha=2",
            "method.num_ddim_timesteps=10"],
    # LoRA student and LoRA critic on one shared base (one DDP module, two optimizers), GAN head on, a critic-only
    # iteration between student iterations, backward simulation: several forwards of the shared UNet per backward
    "dmd2": ["recipe=dmd2", "train.steps=4", "student.mode=lora", "method.critic_mode=lora", "student.lora.rank=2",
             "student.lora.alpha=2", "method.critic_rank=2", "method.critic_alpha=2", "student.lora.targets=[]",
             "method.critic_steps_per_student_step=2", "method.gan_generator_weight=0.01",
             "method.gan_critic_weight=0.01", "train.lr=1e-3"],
}


def run(teacher: Path, out: Path, recipe: str, processes: int, batch: int) -> None:
    args = [str(ROOT / "scripts" / "distill.py"), *RECIPES[recipe], f"teacher.pretrained={teacher}",
            f"output_dir={out}", f"data.batch_size={batch}", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=0", "sample.grid_size=2", "train.progress=false"]
    cmd = [*LAUNCH, "--main_process_port", free_port(), *args] if processes > 1 else [sys.executable, *args]
    done = subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return {f"{f.stem}/{k}": v for f in sorted(ckpt.glob("trainable-*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_with_half_batches_match_one_process(recipe: str, teacher_dir: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(teacher_dir, one, recipe, processes=1, batch=4)
    run(teacher_dir, two, recipe, processes=2, batch=2)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        losses = [k for k in a if k.startswith("loss/")]
        assert losses and set(losses) == {k for k in b if k.startswith("loss/")}
        for k in losses:   # measured (2026-12-02): relative differences up to 1.3e-7 (float32 sums, other order)
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys() and wa
    for k in wa:   # measured: max |difference| 3.0e-8 (LCM) and 4.9e-6 (DMD2: Adam with beta1 = 0 normalises each
        #          update, so rounding differences in tiny gradients grow) against weights up to 2
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)
    # peft starts lora_B at zero: a non-zero one trained, so the comparison above is not vacuous
    assert any("lora_B" in k and wa[k].abs().max() > 0 for k in wa)


_NO_GAN = [a for a in RECIPES["dmd2"] if not a.startswith("method.gan_")] + ["method.gan_generator_weight=0",
                                                                          "method.gan_critic_weight=0"]
FSDP2 = {   # DMD2's GAN head is off: under FSDP2 a role must train one network, and the head is a second one
    "lcm": RECIPES["lcm"],
    "dmd2": _NO_GAN,                                                           # one shared base, two adapters
    "dmd2-full": [*_NO_GAN, "student.mode=full", "method.critic_mode=full"],   # two sharded networks
}


def fsdp2_run(teacher: Path, out: Path, recipe: str, engine: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    args = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), str(out), "--engine", engine, *FSDP2[recipe],
            f"teacher.pretrained={teacher}", f"output_dir={out}-run", "train.progress=false",
            f"data.batch_size={4 if engine == 'single' else 2}"]
    cmd = [*LAUNCH, "--main_process_port", free_port(), *args] if engine == "fsdp2" else [sys.executable, *args]
    done = subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "rows.json").read_text()), load_file(out / "weights.safetensors")


@pytest.mark.parametrize("recipe", sorted(FSDP2))
def test_fsdp2_on_two_processes_matches_one_process(recipe: str, teacher_dir: Path, tmp_path: Path):
    """accelerate's FSDP2 (full shard, DTensor parameters and Adam states) on 2 CPU processes with half batches:
    the losses and the gathered trained weights of the 1-process run (tests/fsdp2_cpu_train.py forces accelerate's
    FSDP2 path on CPU, which accelerate enables only on GPUs)."""
    rows_one, w_one = fsdp2_run(teacher_dir, tmp_path / "one", recipe, "single")
    rows_two, w_two = fsdp2_run(teacher_dir, tmp_path / "two", recipe, "fsdp2")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for k in (k for k in a if k.startswith("loss/")):   # measured: up to 9.5e-6 relative (DMD2), 2.4e-7 (LCM),
            #                                                    3.6e-7 (DMD2 full)
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert w_one.keys() == w_two.keys()
    if "full" not in recipe:   # peft starts lora_B at zero: a non-zero one trained
        assert any("lora_B" in k and w_one[k].abs().max() > 0 for k in w_one)
    assert any(k.startswith("student/") for k in w_one) and any(k.startswith("critic/") for k in w_one) \
        or recipe == "lcm"
    for k in w_one:   # measured: max |difference| 9.3e-6 (DMD2), 6e-8 (LCM), 4.4e-6 (DMD2 full)
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=3e-5, msg=k)


def test_fsdp2_refuses_what_it_cannot_shard_in_one_line(teacher_dir: Path, tmp_path: Path):
    """LCM with a full student keeps an EMA target network that FSDP2 does not shard; DMD2's GAN head makes the
    critic role span two networks."""
    for name, extra, needle in (("ema", [*RECIPES["lcm"], "student.mode=full"], "keeps a target network beside"),
                                ("gan", RECIPES["dmd2"], "under FSDP2 each role must train one network")):
        out = tmp_path / name
        args = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), str(out), "--engine", "fsdp2", *extra,
                f"teacher.pretrained={teacher_dir}", f"output_dir={out}-run", "data.batch_size=2",
                "train.progress=false"]
        done = subprocess.run([*LAUNCH, "--main_process_port", free_port(), *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode != 0 and "error: " in done.stderr and needle in done.stderr, done.stderr[-2000:]


def test_a_checkpoint_resumes_on_another_world_size(teacher_dir: Path, tmp_path: Path):
    """Checkpoints hold full tensors keyed by name and the draws are keyed by global position: a DMD2 run saved by
    1 process at step 2 and resumed by 2 processes (half batches) ends where the uninterrupted 1-process run does."""
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    run(teacher_dir, whole, "dmd2", processes=1, batch=4)
    steps = [a for a in RECIPES["dmd2"] if not a.startswith("train.steps")]
    first = [sys.executable, str(ROOT / "scripts" / "distill.py"), *steps, "train.steps=2",
             f"teacher.pretrained={teacher_dir}", f"output_dir={moved}", "data.batch_size=4", "train.log_every=1",
             "train.sample_every=0", "train.checkpoint_every=0", "sample.grid_size=2", "train.progress=false"]
    assert subprocess.run(first, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600).returncode == 0
    second = [*LAUNCH, "--main_process_port", free_port(), *first[1:]]
    second = [a for a in second if a not in ("train.steps=2", "data.batch_size=4")]
    second += ["train.steps=4", "data.batch_size=2", "resume=latest"]
    done = subprocess.run(second, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = final_weights(whole), final_weights(moved)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, moved)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for x, y in zip(*rows):
        for k in (k for k in x if k.startswith("loss/")):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
