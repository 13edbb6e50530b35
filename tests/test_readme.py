"""The README's toy commands and its stock-Diffusers snippet, run as a newcomer would (with fewer steps)."""
import re
import shlex
from pathlib import Path

import pytest

from fewstep.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# what the tests add so the README's commands run in seconds: (command, extra arguments)
FAST = {"distill": ["train.steps=4", "train.checkpoint_every=1", "train.sample_every=2", "data.batch_size=8",
                    "sample.grid_size=4", "train.progress=false"],
        "sample": ["--num-images", "4"], "eval": ["--num-images", "20", "--no-progress"],
        "bench": ["--repeats", "1", "--no-progress"]}


def block_after(marker: str, lang: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```{lang}\n(.*?)```", README, re.S)
    assert match, f"README has no ```{lang} block after <!-- {marker} -->"
    return match.group(1)


def main_command() -> list[str]:
    """The `fewstep ...` part of the README's first command (after the installs)."""
    line = next(line for line in README.splitlines() if line.startswith("python -m pip install torch") and "&&" in
                line and "pytest" not in line)
    words = shlex.split(line.rsplit("&&", 1)[1])
    assert words[0] == "fewstep", words
    return words[1:]


def in_sandbox(tmp_path: Path, monkeypatch) -> None:
    """Run from a folder that looks like the repository root (the README's relative paths) without touching it."""
    (tmp_path / "fewstep").mkdir()
    (tmp_path / "fewstep" / "assets").symlink_to(ROOT / "fewstep" / "assets")
    monkeypatch.chdir(tmp_path)


def test_stock_snippet_runs_on_the_main_commands_export(tmp_path: Path, monkeypatch):
    """The main command (with 2 training steps) makes a LoRA export, and the README's stock-Diffusers snippet
    loads it as written; the student's image differs from the bare teacher's for the same generator, so the LoRA
    was really applied."""
    import diffusers
    import torch

    in_sandbox(tmp_path, monkeypatch)
    argv = main_command()
    assert "recipe=lcm" in argv and "model=toy-digits" in argv
    main(argv + ["train.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "data.batch_size=8",
                 "sample.grid_size=2", "train.progress=false"])
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()
    scope: dict = {}
    exec(block_after("stock-snippet", "python"), scope)
    student = scope["image"]
    assert student.size == (16, 16) and Path("digit-3.png").is_file()
    teacher = diffusers.DiffusionPipeline.from_pretrained("fewstep/assets/toy-digits")
    teacher.scheduler = scope["pipe"].scheduler
    meta = scope["meta"]
    plain = teacher("a handwritten digit 3", timesteps=meta["timesteps"], guidance_scale=meta["guidance_scale"],
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert list(student.getdata()) != list(plain.getdata())


@pytest.mark.slow
def test_walkthrough_runs_in_order(tmp_path: Path, monkeypatch):
    """The main command, then every command of the README's toy walk-through in its order, with fewer steps and
    images. The runs keep checkpoints 3 and 4 of 4 instead of 750 and 1000 of 1000, so the export names step 3."""
    in_sandbox(tmp_path, monkeypatch)
    lines = [line for line in block_after("toy-walkthrough", "bash").splitlines() if line and not line.startswith("#")]
    commands = [main_command()] + [shlex.split(line.replace("step-0000750", "step-0000003"))[1:] for line in lines]
    assert [c[0] for c in commands] == ["distill", "sample", "sample", "distill", "export", "eval", "bench"]
    for words in commands:
        main(words + FAST.get(words[0], []))
    assert (tmp_path / "runs" / "lcm-toy" / "exports" / "step-0000003" / "fewstep.json").is_file()
    assert (tmp_path / "reports" / "toy" / "report.json").is_file()
    assert (tmp_path / "reports" / "bench" / "bench.json").is_file()
