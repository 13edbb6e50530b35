"""`fewstep sample` on the shipped toy teacher, and the CUDA-only switches failing clearly on a CPU machine."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.models.teacher import set_attention_backend


def test_toy_teacher_sampling_writes_grayscale_pngs_and_metadata(tmp_path: Path):
    out = tmp_path / "s"
    main(["sample", "toy-digits", "--out", str(out), "--num-images", "12", "--steps", "4", "--guidance", "2",
          "--seed", "5"])
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows[:11]] == [f"a handwritten digit {i % 10}" for i in range(11)]
    assert rows[0] == {"file": "00000.png", "prompt": "a handwritten digit 0", "seed": 5, "steps": 4, "guidance": 2.0}
    with Image.open(out / "00003.png") as img:
        assert img.mode == "L" and img.size == (16, 16)
    again = tmp_path / "again"
    main(["sample", "toy-digits", "--out", str(again), "--num-images", "2", "--steps", "4", "--guidance", "2",
          "--seed", "5", "--batch-size", "1"])
    with Image.open(out / "00001.png") as a, Image.open(again / "00001.png") as b:   # each image owns its seed
        assert list(a.getdata()) == list(b.getdata())


def test_existing_output_is_not_overwritten(tmp_path: Path, capsys):
    out = tmp_path / "s"
    main(["sample", "toy-digits", "--out", str(out), "--num-images", "1", "--steps", "2"])
    before = (out / "metadata.jsonl").read_text()
    with pytest.raises(SystemExit) as info:
        main(["sample", "toy-digits", "--out", str(out), "--num-images", "1", "--steps", "2"])
    assert info.value.code == 2 and "already holds samples" in capsys.readouterr().err
    assert (out / "metadata.jsonl").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
@pytest.mark.parametrize("backend", ["flash", "efficient", "xformers"])
def test_cuda_only_attention_backends_fail_clearly(backend: str):
    with pytest.raises(FewstepError, match=f"attention={backend} needs CUDA"):
        set_attention_backend(torch.nn.Linear(2, 2), backend)


def test_portable_attention_backends_and_precision(capsys, tmp_path: Path):
    set_attention_backend(torch.nn.Linear(2, 2), "sdpa")
    with set_attention_backend(torch.nn.Linear(2, 2), "math"):
        pass
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["sample", "toy-digits", "--out", str(tmp_path / "p"), "--precision", "bf16", "--num-images", "1"])
        assert "--precision bf16 needs a CUDA device" in capsys.readouterr().err
