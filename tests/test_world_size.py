"""World-size invariance (issue 12): every random draw is keyed by the sample's global position and the step, and
gradients are averaged by accelerate's DDP, so 2 CPU processes (gloo) with `data.batch_size=B/2` each run the same
math as 1 process with B. The losses in metrics.jsonl and the final trained weights must agree to within the
rounding of a different reduction order (the tolerances below are a margin over what was measured: see the note
on each)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipelines import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
# Adam's first steps are sign steps, lr * g / (|g| + eps): an element whose gradient cancels down to rounding level
# moves by up to lr either way depending on the summation order, which differs between CPUs (measured with eps=1e-8,
# DMD2-LoRA's 4 steps: 4.9e-6 on an Intel Xeon, 2.4e-5 on an AMD EPYC; FSDP2 full students failed 3e-5 there). With
# eps=1e-4 such an element moves by lr * |g| / eps instead, so the weight comparison measures the math, not the sign
# of a rounding error (AMD EPYC, eps=1e-4: scripts/world_size_diffs.py, quoted at each comparison below).
INVARIANCE = ["train.adam_eps=1e-4"]
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
    # AC-DMD: CPS rollouts with a random stop (one choice for the global batch), per-sample renoising and CPS
    # noise, the consistency regulariser's two extra transitions; LoRA student and fake score on one base
    "rtdmd_cold": ["recipe=rtdmd_cold", "train.steps=4", "student.mode=lora", "method.critic_mode=lora",
                   "student.lora.rank=2", "student.lora.alpha=2", "method.critic_rank=2", "method.critic_alpha=2",
                   "student.lora.targets=[]", "method.critic_steps_per_student_step=2", "train.lr=1e-3",
                   "train.ema_decay=0"],
    # RTDMD stage 2: prompt groups of 2 (whole groups on each process), prompt-seeded shared noise, the SubGRPO
    # step choice, advantages with the gathered global std, PPO + KL to stage 1 + AC-DMD aux + reward backprop
    "rtdmd": ["recipe=rtdmd", "train.steps=3", "student.mode=lora", "method.critic_mode=lora", "student.lora.rank=2",
              "student.lora.alpha=2", "method.critic_rank=2", "method.critic_alpha=2", "student.lora.targets=[]",
              "method.group_size=2", "train.lr=1e-3", "method.kl_weight=1"],
}
RECIPES = {name: [*args, *INVARIANCE] for name, args in RECIPES.items()}


def run(teacher: Path, out: Path, recipe: str, processes: int, batch: int) -> None:
    args = [str(ROOT / "scripts" / "distill.py"), *RECIPES[recipe], f"teacher.pretrained={teacher}",
            *([f"method.real_teacher_path={teacher}"] if recipe == "rtdmd" else []),
            f"output_dir={out}", f"data.batch_size={batch}", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=0", "sample.grid_size=2", "train.progress=false"]
    cmd = [*LAUNCH, "--main_process_port", free_port(), *args] if processes > 1 else [sys.executable, *args]
    done = subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's trained weights, flattened, as `trainable-<role>/<name>`: from its safetensors
    files, or read whole from the shards every process wrote (FSDP2, ZeRO)."""
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    if (ckpt / "shards").is_dir():
        from fewstep.train.shards import read_flat

        return {"trainable-{}/{}".format(*k.split(".", 2)[1:]): v for k, v in read_flat(ckpt).items()
                if k.startswith("trainable.")}
    return {f"{f.stem}/{k}": v.reshape(-1) for f in sorted(ckpt.glob("trainable-*.safetensors"))
            for k, v in load_file(f).items()}


def _slow_unless(names: set[str], cases) -> list:
    """The cases of a parametrize list, those outside `names` marked slow (`pytest -m slow` runs them): the default
    run keeps one case per mechanism within the CI budget (measured per case: 20-35 s on 2 cores)."""
    return [c if c in names else pytest.param(c, marks=pytest.mark.slow) for c in cases]


# default run: LCM-LoRA and DMD2-LoRA on a shared base; slow: the RTDMD stages (21-22 s each)
@pytest.mark.parametrize("recipe", _slow_unless({"lcm", "dmd2"}, sorted(RECIPES)))
def test_two_processes_with_half_batches_match_one_process(recipe: str, teacher_dir: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(teacher_dir, one, recipe, processes=1, batch=4)
    run(teacher_dir, two, recipe, processes=2, batch=2)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        losses = [k for k in a if k.startswith("loss/")]
        assert losses and set(losses) == {k for k in b if k.startswith("loss/")}
        for k in losses:   # measured by scripts/world_size_diffs.py (2026-12-04, eps 1e-4): relative differences
            #                up to 5.2e-7 (LCM, DMD2), 4.8e-6 (AC-DMD) and 1.1e-5 (RTDMD stage 2)
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys() and wa
    for k in wa:   # measured (same run): max |difference| 3e-8 (LCM, AC-DMD) and 6e-8 (DMD2, RTDMD stage 2)
        #          against weights up to 2; at eps 1e-8 DMD2 reached 2.4e-5 (see INVARIANCE)
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)
    # peft starts lora_B at zero: a non-zero one trained, so the comparison above is not vacuous
    assert any("lora_B" in k and wa[k].abs().max() > 0 for k in wa)


_NO_GAN = [a for a in RECIPES["dmd2"] if not a.startswith("method.gan_")] + ["method.gan_generator_weight=0",
                                                                          "method.gan_critic_weight=0"]
FSDP2 = {
    "lcm": RECIPES["lcm"],
    # a full student with its EMA target network (a follower FSDP2 shards like the student) and train.ema_decay
    # (no LR warm-up, which the LCM preset has: the target moves by 1.6e-3, well beyond the tolerances below)
    "lcm-full": [*RECIPES["lcm"], "student.mode=full", "train.lr=1e-3", "train.warmup_steps=0",
                 "train.ema_decay=0.5", "method.target_ema_decay=0.5"],
    # one shared base, two adapters, and the GAN head: the critic role trains two networks, sharded as one Joint
    "dmd2": RECIPES["dmd2"],
    "dmd2-full": [*_NO_GAN, "student.mode=full", "method.critic_mode=full"],   # two sharded networks
    "lcm-ac": RECIPES["lcm"],   # with FSDP's activation checkpointing: each UNet block recomputed in the backward
    # with fsdp_cpu_ram_efficient_loading (recipes/accelerate/fsdp2.yaml): process 1's networks start on the meta
    # device and get process 0's weights by broadcast; a follower, a Joint and a full critic
    "lcm-full-rl": [*RECIPES["lcm"], "student.mode=full", "train.lr=1e-3", "train.warmup_steps=0",
                    "train.ema_decay=0.5", "method.target_ema_decay=0.5"],
    "dmd2-full-rl": [*RECIPES["dmd2"], "student.mode=full", "method.critic_mode=full"],
}


def fsdp2_run(teacher: Path, out: Path, recipe: str, engine: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    args = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), str(out), "--engine", engine, *FSDP2[recipe],
            f"teacher.pretrained={teacher}", f"output_dir={out}-run", "train.progress=false",
            f"data.batch_size={4 if engine == 'single' else 2}"]
    cmd = [*LAUNCH, "--main_process_port", free_port(), *args] if engine != "single" else [sys.executable, *args]
    done = subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "rows.json").read_text()), load_file(out / "weights.safetensors")


# default run: DMD2-LoRA (one base, two adapters, the GAN head as a Joint) and a full LCM student with its EMA
# follower; slow: the other five (about 21 s each)
@pytest.mark.parametrize("recipe", _slow_unless({"dmd2", "lcm-full"}, sorted(FSDP2)))
def test_fsdp2_on_two_processes_matches_one_process(recipe: str, teacher_dir: Path, tmp_path: Path):
    """accelerate's FSDP2 (full shard, DTensor parameters and Adam states) on 2 CPU processes with half batches:
    the losses and the gathered trained weights of the 1-process run (tests/fsdp2_cpu_train.py forces accelerate's
    FSDP2 path on CPU, which accelerate enables only on GPUs)."""
    rows_one, w_one = fsdp2_run(teacher_dir, tmp_path / "one", recipe, "single")
    suffix = recipe.rsplit("-", 1)[-1] if recipe.endswith(("-ac", "-rl")) else ""
    rows_two, w_two = fsdp2_run(teacher_dir, tmp_path / "two", recipe, f"fsdp2-{suffix}" if suffix else "fsdp2")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for k in (k for k in a if k.startswith("loss/")):   # measured by scripts/world_size_diffs.py
            #   (2026-12-04, eps 1e-4): up to 2.7e-6 relative, except one DMD2-full loss near 0 (2.1e-2 relative,
            #   inside the absolute bound)
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert w_one.keys() == w_two.keys()
    if "full" not in recipe:   # peft starts lora_B at zero: a non-zero one trained
        assert any("lora_B" in k and w_one[k].abs().max() > 0 for k in w_one)
    assert any(k.startswith("student/") for k in w_one) and any(k.startswith("critic/") for k in w_one) \
        or recipe.startswith("lcm")
    for k in w_one:   # measured (same run): max |difference| 6e-8 (DMD2 with the GAN head), 3e-8 (LCM-LoRA, with
        #               or without activation checkpointing), 3.0e-6 (LCM full), 2.3-2.6e-7 (DMD2 full)
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=3e-5, msg=k)


@pytest.mark.parametrize("recipe,needle", [
    ("dmd2", "recomputes UNet2DConditionModel blocks under the wrong LoRA adapter"),   # two roles, one base
    ("dmd2-full-gan", "cannot wrap UNet2DConditionModel and "),   # the critic role trains the critic and GAN head
])
def test_fsdp2_activation_checkpointing_refuses_what_it_would_get_wrong(recipe: str, needle: str, teacher_dir: Path,
                                                                        tmp_path: Path):
    """FSDP's own activation checkpointing, refused in one line (exit 2) before anything is wrapped where it would
    recompute under the wrong adapter or cannot wrap a role's networks as one unit."""
    extra = {"dmd2": RECIPES["dmd2"], "dmd2-full-gan": [*RECIPES["dmd2"], "student.mode=full",
                                                         "method.critic_mode=full"]}[recipe]
    out = tmp_path / recipe
    args = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), str(out), "--engine", "fsdp2-ac", *extra,
            f"teacher.pretrained={teacher_dir}", f"output_dir={out}-run", "data.batch_size=2", "train.progress=false"]
    done = subprocess.run([*LAUNCH, "--main_process_port", free_port(), *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "error: " in done.stderr and needle in done.stderr, done.stderr[-2000:]
    assert not out.exists()


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


def _lora_export(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "pytorch_lora_weights.safetensors")


def resume_copy(src: Path, dest: Path, step: int = 2) -> Path:
    """A new run folder holding `src`'s config, its metrics (where it logged any) and its step-`step` checkpoint
    only: a run resumed there (`resume=latest`) can start from nothing else."""
    (dest / "checkpoints").mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl"):
        if (src / f).exists():
            shutil.copy(src / f, dest / f)
    name = f"step-{step:07d}"
    shutil.copytree(src / "checkpoints" / name, dest / "checkpoints" / name)
    return dest


def test_fsdp2_runs_save_shards_export_full_weights_and_resume_anywhere(teacher_dir: Path, tmp_path: Path):
    """`fewstep distill` under FSDP2 on 2 processes: each process writes its shard of every checkpoint (safetensors
    only), the sample grids and the export come out as in any run, and the export equals the 1-process run's.
    Its step-2 checkpoint resumes on 1 process that does not shard (the shards are read whole) and on 2 FSDP2
    processes (resharded), and both end where the uninterrupted run does, as does the 1-process run's checkpoint of
    full tensors resumed under FSDP2."""
    lcm = [*RECIPES["lcm"], "train.steps=4", "train.lr=1e-3", f"teacher.pretrained={teacher_dir}", "train.log_every=1",
           "train.sample_every=2", "train.checkpoint_every=2", "sample.grid_size=2", "train.progress=false"]
    harness = [str(ROOT / "tests" / "fsdp2_cpu_train.py"), "unused", "--engine", "fsdp2-run"]

    def fsdp2(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [*LAUNCH, "--main_process_port", free_port(), *harness, *lcm, f"output_dir={out}", "data.batch_size=2",
               *extra]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)

    def single(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "scripts" / "distill.py"), *lcm, f"output_dir={out}", "data.batch_size=4",
               *extra]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)

    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := single(one)).returncode == 0, done.stderr[-3000:]
    assert (done := fsdp2(two)).returncode == 0, done.stderr[-3000:]
    ck = two / "checkpoints" / "step-0000002"
    assert len(list((ck / "shards").glob("*.safetensors"))) == 2          # one file per process
    assert not list(ck.glob("*.safetensors")) and not list(ck.rglob("*.distcp")) and not list(ck.rglob(".metadata"))
    assert sorted(p.name for p in (two / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    reference = _lora_export(one)
    assert any(v.abs().max() > 1e-5 for k, v in reference.items() if "lora_B" in k or "lora.up" in k), "vacuous"

    def close_to_reference(out: Path) -> None:
        got = _lora_export(out)
        assert got.keys() == reference.keys()
        for k in reference:   # measured: max |difference| 6e-8 (FSDP2 run and resumed), against LoRA up-weights
            #                 of at most 1.2e-4 after 4 steps, so the bound is absolute and well below them
            torch.testing.assert_close(got[k], reference[k], rtol=1e-3, atol=1e-6, msg=k)

    close_to_reference(two)
    for name, launch in (("on-one", single), ("on-two", fsdp2)):
        moved = resume_copy(two, tmp_path / name)
        done = launch(moved, "resume=latest")
        assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
        close_to_reference(moved)
    # the 1-process run's step-2 checkpoint of full tensors, resumed by 2 FSDP2 processes (each takes its rows)
    from_one = resume_copy(one, tmp_path / "from-one")
    done = fsdp2(from_one, "resume=latest")
    assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
    close_to_reference(from_one)
    # `fewstep export` of a sharded checkpoint, in one process: the FSDP2 run's own export, bit for bit
    done = subprocess.run([sys.executable, "-m", "fewstep", "export", str(two / "checkpoints" / "step-0000004"),
                           "--out", str(tmp_path / "again")], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    again, ran = load_file(tmp_path / "again" / "pytorch_lora_weights.safetensors"), _lora_export(two)
    assert again.keys() == ran.keys() and all(torch.equal(again[k], ran[k]) for k in ran)
    # a shard overwritten with garbage of the same size (its size check passes): one line naming the good one
    shard = sorted((two / "checkpoints" / "step-0000004" / "shards").glob("*.safetensors"))[-1]
    shard.write_bytes(b"\x07" * shard.stat().st_size)
    done = single(two, "resume=latest", "train.steps=6")
    assert done.returncode == 2 and done.stderr.count("error: ") == 1 and "is damaged" in done.stderr \
        and "resume=" in done.stderr and "step-0000002" in done.stderr, done.stderr[-2000:]


def _exports(out: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(out / 'export')}/{k}": v for f in sorted((out / "export").rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.parametrize("recipe", _slow_unless({"dmd2"}, ["dmd2-full", "lcm-full", "dmd2"]))   # 57-67 s each
def test_fsdp2_distill_exports_and_resumes_like_one_process(recipe: str, teacher_dir: Path, tmp_path: Path):
    """`fewstep distill` under FSDP2 on 2 processes exports (gathered onto the main process from the shards of
    every process) what the 1-process run exports; its sharded step-2 checkpoint resumed by 1 process that does
    not shard, and the 1-process run's step-2 checkpoint resumed under FSDP2, end at the same export:
    - dmd2-full: a full student and a full critic, two sharded UNets;
    - lcm-full: the export is the EMA target network, a follower sharded like the student, with train.ema_decay
      (its shadow weights are in the shards too);
    - dmd2: LoRA student and critic on one base plus the GAN head, which the critic role trains with the base
      (one Joint for FSDP2's prepare)."""
    args = [*FSDP2[recipe], f"teacher.pretrained={teacher_dir}", "train.sample_every=0", "train.checkpoint_every=2",
            "sample.grid_size=2", "train.progress=false"]
    two = subprocess.run([*LAUNCH, "--main_process_port", free_port(), str(ROOT / "tests" / "fsdp2_cpu_train.py"),
                          "unused", "--engine", "fsdp2-run", *args, f"output_dir={tmp_path / 'two'}",
                          "data.batch_size=2"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    distill = [sys.executable, str(ROOT / "scripts" / "distill.py"), *args, "data.batch_size=4"]
    one = subprocess.run([*distill, f"output_dir={tmp_path / 'one'}"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert len(list((tmp_path / "two" / "checkpoints" / "step-0000002" / "shards").glob("*.safetensors"))) == 2
    moved = resume_copy(tmp_path / "two", tmp_path / "moved")
    resumed = subprocess.run([*distill, f"output_dir={moved}", "resume=latest"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    # and the 1-process run's step-2 checkpoint of full tensors, resumed by 2 FSDP2 processes
    from_one = resume_copy(tmp_path / "one", tmp_path / "from-one")
    resumed = subprocess.run([*LAUNCH, "--main_process_port", free_port(), str(ROOT / "tests" / "fsdp2_cpu_train.py"),
                              "unused", "--engine", "fsdp2-run", *args, f"output_dir={from_one}", "data.batch_size=2",
                              "resume=latest"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    a = _exports(tmp_path / "one")
    # the export moved off the teacher by more than the comparison below allows (3e-5 + 1e-4 x weights up to 2),
    # so an export of untrained weights fails it; measured: 1.4e-3 (dmd2-full), 1.6e-3 (lcm-full), 2.4e-3 (dmd2)
    if "full" in recipe:
        teacher = load_file(teacher_dir / "unet/diffusion_pytorch_model.safetensors")
        unet = {k.split("/", 2)[-1]: v for k, v in a.items() if k.startswith("unet/")}
        assert unet.keys() == teacher.keys()
        assert max(float((unet[k] - teacher[k]).abs().max()) for k in unet) > 5e-4, "vacuous"
    else:
        assert any(("lora_B" in k or "lora.up" in k) and v.abs().max() > 5e-4 for k, v in a.items()), "vacuous"
    for out in ("two", "moved", "from-one"):
        b = _exports(tmp_path / out)
        assert a.keys() == b.keys(), out
        for k in a:   # the tolerance of the FSDP2 training-step test above
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-5, msg=f"{out}: {k}")


@pytest.mark.slow   # 25 s
def test_fsdp2_evaluation_during_training_scores_like_one_process(teacher_dir: Path, tmp_path: Path):
    """`train.eval_every` under FSDP2: the student's forwards are collective, so both processes run the same
    number of generation batches although 129 images split 65 / 64 (batches of 64: process 1 runs an empty round;
    without it the run hangs, which the timeout turns into a failure). The scores equal the 1-process run's."""
    args = [*RECIPES["lcm"], "train.steps=1", f"teacher.pretrained={teacher_dir}", "train.sample_every=0",
            "train.checkpoint_every=0", "sample.grid_size=2", "train.progress=false", "train.eval_every=1",
            "train.eval_num_images=129"]
    one = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), *args, "data.batch_size=4",
                          f"output_dir={tmp_path / 'one'}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*LAUNCH, "--main_process_port", free_port(), str(ROOT / "tests" / "fsdp2_cpu_train.py"),
                          "unused", "--engine", "fsdp2-run", *args, "data.batch_size=2",
                          f"output_dir={tmp_path / 'two'}"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "eval.jsonl").read_text()) for d in ("one", "two"))
    assert a.keys() == b.keys() and "eval/fid[digits-cnn]" in a
    for k in a:   # measured: relative differences up to 6e-13 (FID) and 0 (accuracy, CLIP score)
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
