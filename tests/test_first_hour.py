"""A newcomer's first hour (issue 10): every bad input is one `error:` line with exit code 2, found before any model
loads, and no command reuses, empties or overwrites a folder it was not explicitly allowed to."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["data.batch_size=2", "sample.grid_size=2", "train.progress=false", "student.lora.rank=2",
        "student.lora.alpha=2", "method.num_ddim_timesteps=10", "student.mode=lora"]


def tiny_run(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "recipe=lcm", f"teacher.pretrained={teacher}", f"output_dir={out}", *TINY, *extra]


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `fewstep ARGV` in-process; it must exit 2 with exactly one stderr line, `error: ...`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_safetensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())


# -- launchers --------------------------------------------------------------------------------------------------

def test_fewstep_launch_reports_bad_config_in_one_line_exit_2(tmp_path: Path):
    """`fewstep launch` is `accelerate launch` with the guard: a bad key is refused before any process starts."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fewstep.cli", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(ROOT / "scripts" / "distill.py"),
           "train.step=10", f"output_dir={out}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "unknown config key 'train.step'" in done.stderr
    assert not out.exists()


def test_fewstep_launch_passes_a_childs_exit_code_through(tmp_path: Path):
    """An error only the child can find (here: a LoRA target the tiny teacher lacks, found after it loads) comes
    back as the child's one line and exit code 2, not as accelerate's CalledProcessError traceback."""
    from tiny_pipelines import tiny_sd

    teacher = tmp_path / "teacher"
    tiny_sd().save_pretrained(str(teacher), safe_serialization=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fewstep.cli", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(ROOT / "scripts" / "distill.py"),
           *tiny_run(teacher, out, "student.lora.targets=[no_such_layer]")[1:]]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in done.stderr and len(errors) == 1 and lines[-1] == errors[0], lines
    assert "student.lora.targets ['no_such_layer'] match no module" in errors[0]
    assert not out.exists()


def test_plain_accelerate_launch_child_prints_one_line_exit_2(tmp_path: Path):
    """Under stock `accelerate launch` the child's contract holds (one line, exit 2); accelerate's own launcher
    then adds its CalledProcessError and exits 1, which is why the README uses `fewstep launch`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(ROOT / "scripts" / "distill.py"), "train.step=10"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "unknown config key 'train.step'" in ours[0]
    assert "returned non-zero exit status 2" in done.stderr


def test_console_script_exits_0_after_a_run(teacher_dir: Path, tmp_path: Path):
    """`fewstep distill` as the console script calls it (`sys.exit(main())`) ends with exit code 0."""
    code = "import sys; from fewstep.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, *tiny_run(teacher_dir, tmp_path / "r", "train.steps=1")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: step 1" in done.stdout


def test_preflight_loads_no_torch(tmp_path: Path):
    """Config, teacher path, output folder and resume point are all checked before torch is even imported, so
    bad input is reported in a fraction of a second and a failed start creates nothing."""
    code = ("import sys; from fewstep.distill import preflight; from fewstep.errors import FewstepError\n"
            f"try: preflight(['teacher.pretrained=/no/such', 'output_dir={tmp_path / 'r'}'])\n"
            "except FewstepError as e: print(e)\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "False False", done.stdout + done.stderr
    assert "teacher path '/no/such' does not exist" in done.stdout
    assert not (tmp_path / "r").exists()


# -- distill ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["train.lr_schedule=bogus"], "bad value train.lr_schedule='bogus'; choose one of ['linear'"),
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (["train.betas=[0.9]"], "train.betas must be two numbers in [0, 1)"),
    (["train.betas=[0.9"], "cannot parse overrides"),
    (["sample.timesteps=[2.0,0.5]"], "sample.timesteps are times in (0, 1]"),
    (["sample.guidance_scale=-3"], "sample.guidance_scale must be >= 1"),
    (["method.loss=l3"], "bad value method.loss='l3'; choose one of ['huber', 'l2']"),
    (["train.ema_decay=1.5"], "train.ema_decay must be in [0, 1)"),
    (["resume=/no/such/ckpt"], "resume=/no/such/ckpt does not exist"),
    (["teacher.pretrained=/no/such/folder"], "teacher path '/no/such/folder' does not exist"),
    (["data.source=prompts", "data.path=/no/prompts.txt"], "prompt file /no/prompts.txt does not exist"),
    (["data.source=folder", "data.path=/no/images"], "data.path=/no/images is not a folder"),
])
def test_bad_config_is_one_line_before_loading(capsys, tmp_path: Path, extra, needle):
    out = tmp_path / "run"
    line = one_error_line(capsys, ["distill", "recipe=lcm", f"output_dir={out}", *extra])
    assert needle in line
    assert not out.exists()


def test_other_bad_distill_inputs(capsys, teacher_dir: Path, tmp_path: Path):
    as_file = tmp_path / "file"
    as_file.write_text("x")
    assert "is a file; pass a folder path" in one_error_line(capsys, tiny_run(teacher_dir, as_file))
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a handwritten digit \xe9\n".encode("latin-1"))
    line = one_error_line(capsys, tiny_run(teacher_dir, tmp_path / "p", "data.source=prompts", f"data.path={latin1}"))
    assert "is not UTF-8 text" in line
    line = one_error_line(capsys, tiny_run(teacher_dir, tmp_path / "f", "train.mixed_precision=fp16"))
    if "CUDA" not in line:
        pytest.fail(line)
    line = one_error_line(capsys, tiny_run(teacher_dir, tmp_path / "t", "student.lora.targets=[no_such_layer]"))
    assert "match no module of the UNet2DConditionModel; use names such as [" in line
    assert not (tmp_path / "t").exists()


def test_yaml_errors_keep_line_and_column_and_recipe_paths_work(capsys, tmp_path: Path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("algorithm: lcm\ntrain:\n  steps: [1, 2\n")
    line = one_error_line(capsys, ["distill", f"recipe={bad}", f"output_dir={tmp_path / 'r'}"])
    assert "malformed YAML in" in line and "line 4, column 1" in line
    from fewstep.config import load_config

    good = tmp_path / "my_lcm.yaml"
    good.write_text((ROOT / "recipes" / "lcm.yaml").read_text())
    for spec in (str(good), str(good)[:-5]):
        cfg = load_config([f"recipe={spec}"])
        assert cfg.recipe == "my_lcm" and cfg.algorithm == "lcm"
    assert load_config(["recipe=lcm.yaml"]).recipe == "lcm"


def test_a_used_output_dir_is_never_reused(capsys, teacher_dir: Path, tmp_path: Path):
    """A previous run whose checkpoints were deleted keeps its export, config.yaml and metrics.jsonl."""
    out = tmp_path / "r"
    main(tiny_run(teacher_dir, out, "train.steps=1"))
    for ck in (out / "checkpoints").iterdir():
        for f in ck.iterdir():
            f.unlink()
        ck.rmdir()
    before = snapshot(out)
    assert "is not empty" in one_error_line(capsys, tiny_run(teacher_dir, out, "train.steps=2"))
    assert "holds no complete checkpoint" in one_error_line(capsys, tiny_run(teacher_dir, out, "train.steps=2",
                                                                             "resume=latest"))
    assert snapshot(out) == before


def test_only_the_main_process_judges_the_output_dir(tmp_path: Path, monkeypatch):
    """In a multi-process launch the main process writes config.yaml once its models are built; a slower process
    that gets to preflight after that must not take the folder for someone else's run."""
    from fewstep.distill import preflight
    from fewstep.errors import FewstepError

    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("recipe: lcm\n")
    with pytest.raises(FewstepError, match="is not empty"):
        preflight([f"output_dir={out}"])
    monkeypatch.setenv("RANK", "1")
    assert preflight([f"output_dir={out}"]).resume is None


def test_resume_latest_on_a_finished_run_changes_nothing(capsys, teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    main(tiny_run(teacher_dir, out, "train.steps=1"))
    before = snapshot(out)
    capsys.readouterr()
    main(tiny_run(teacher_dir, out, "train.steps=1", "resume=latest"))
    assert "already finished at step 1" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_latest_without_checkpoint_says_it_starts_fresh(capsys, teacher_dir: Path, tmp_path: Path):
    main(tiny_run(teacher_dir, tmp_path / "r", "train.steps=1", "resume=latest"))
    assert "no checkpoint in" in capsys.readouterr().out


def test_end_of_run_says_where_everything_is(capsys, teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    main(tiny_run(teacher_dir, out, "train.steps=1"))
    text = capsys.readouterr().out
    for name in ("export", "samples", "loss curve", "metrics", "checkpoints", "next: fewstep sample"):
        assert name in text
    assert str(out / "samples" / "step-0000001.png") in text and "(LoRA, 4 steps, guidance 1.0)" in text


# -- export -----------------------------------------------------------------------------------------------------

def test_export_refuses_bad_paths_before_loading(capsys, tmp_path: Path):
    line = one_error_line(capsys, ["export", str(tmp_path / "nope")])
    assert "checkpoint path" in line and "does not exist" in line and "config.yaml" not in line
    half = tmp_path / "run" / "checkpoints" / "step-0000003"
    half.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("recipe: lcm\n")
    assert "nor a complete checkpoint (state.json)" in one_error_line(capsys, ["export", str(half)])


def test_export_default_folder_survives_rotation_and_out_is_never_emptied(capsys, teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "r"
    main(tiny_run(teacher_dir, out, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1"))
    capsys.readouterr()
    main(["export", str(out)])
    made = out / "exports" / "step-0000003"
    assert json.loads((made / "fewstep.json").read_text())["train_steps"] == 3
    # the export the run itself wrote: the same sidecar bytes, and the same LoRA tensors and metadata (the
    # safetensors header's metadata order is not reproducible: the writer keeps it in a hash map)
    assert (made / "fewstep.json").read_bytes() == (out / "export" / "fewstep.json").read_bytes()
    assert same_safetensors(made / "pytorch_lora_weights.safetensors", out / "export" / "pytorch_lora_weights.safetensors")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "already exists and is not empty" in one_error_line(capsys, ["export", str(out), "--out", str(mine)])
    assert (mine / "notes.txt").read_text() == "keep me"
    main(["export", str(out), "--out", str(mine), "--overwrite"])
    assert (mine / "fewstep.json").is_file() and not (mine / "notes.txt").exists()


# -- sample, eval, bench ----------------------------------------------------------------------------------------

def test_sample_and_eval_arguments_are_checked_one_by_one(capsys, tmp_path: Path):
    s = ["sample", "toy-digits", "--out", str(tmp_path / "s")]
    assert "--steps: must be >= 1 (got 0)" in one_error_line(capsys, s + ["--steps", "0"])
    assert "--batch-size: must be >= 1" in one_error_line(capsys, s + ["--batch-size", "0"])
    assert "--guidance: must be >= 1" in one_error_line(capsys, s + ["--guidance", "-3"])
    line = one_error_line(capsys, ["eval", "toy-digits", "--protocol", "toy-digits", "--out", str(tmp_path / "e"),
                                   "--num-images", "-1"])
    assert "--num-images" in line and "--batch-size" not in line
    line = one_error_line(capsys, ["eval", str(tmp_path / "no-export"), "--protocol", "toy-digits", "--out",
                                   str(tmp_path / "e")])
    assert "model path" in line and "fewstep export folder" in line and "teacher path" not in line
    assert "unknown protocol" in one_error_line(capsys, ["eval", "toy-digits", "--protocol", "nope", "--out",
                                                         str(tmp_path / "e")]).lower()
    try:
        import torch

        if not torch.cuda.is_available():
            assert "CUDA is not available" in one_error_line(capsys, s + ["--device", "cuda"])
    finally:
        assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_sample_never_overwrites_a_folder(capsys, tmp_path: Path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "00000.png").write_bytes(b"a picture of mine")
    line = one_error_line(capsys, ["sample", "toy-digits", "--out", str(out), "--num-images", "1", "--steps", "1"])
    assert "already exists and is not empty; pass a new folder, or --overwrite" in line
    assert (out / "00000.png").read_bytes() == b"a picture of mine"
    main(["sample", "toy-digits", "--out", str(out), "--num-images", "1", "--steps", "1", "--overwrite"])
    assert (out / "00000.png").read_bytes()[:4] == b"\x89PNG" and (out / "metadata.jsonl").is_file()


def test_a_run_folder_points_at_its_export_and_an_export_without_sidecar_is_refused(capsys, teacher_dir: Path,
                                                                                     tmp_path: Path):
    out = tmp_path / "r"
    main(tiny_run(teacher_dir, out, "train.steps=1", "student.mode=full"))
    index = json.loads((out / "export" / "model_index.json").read_text())
    teacher_index = json.loads((teacher_dir / "model_index.json").read_text())
    assert index["_fewstep_export"] == "fewstep.json"
    assert index.get("requires_safety_checker") == teacher_index.get("requires_safety_checker")
    line = one_error_line(capsys, ["sample", str(out), "--out", str(tmp_path / "s")])
    assert f"did you mean its export, {out / 'export'}?" in line
    (out / "export" / "fewstep.json").unlink()
    assert "whose fewstep.json is missing" in one_error_line(capsys, ["sample", str(out / "export"), "--out",
                                                                      str(tmp_path / "s")])


def test_pickle_weights_are_never_loaded(capsys, tmp_path: Path):
    """A pipeline whose UNet was swapped for a pickle `.bin` is refused (safetensors only), not unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "teacher"
    shutil.copytree(ROOT / "fewstep" / "assets" / "toy-digits", folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet)), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["sample", str(folder), "--out", str(tmp_path / "s"), "--num-images", "1", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: cannot load pipeline") and "safetensors" in err[-1]
    assert not (tmp_path / "s").exists()
