"""Checkpoints are atomic, pruned, and damage gives one clear error."""
import json
from pathlib import Path

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.train import checkpoint as ckpt


def _save(root: Path, step: int, keep: int = 0) -> Path:
    return ckpt.save_checkpoint(root, step, {"trainable-student": {"w": torch.full((2,), float(step))}},
                                {"rng": {"torch": torch.get_rng_state()}}, {"recipe": "lcm"}, keep)


def test_roundtrip_and_latest(tmp_path: Path):
    for s in (1, 2, 3):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    tensors, blobs, meta = ckpt.load_checkpoint(ckpt.latest(tmp_path))
    assert meta["step"] == 3 and tensors["trainable-student"]["w"].tolist() == [3.0, 3.0]
    assert torch.equal(blobs["rng"]["torch"], torch.get_rng_state())


def test_half_written_checkpoint_is_ignored(tmp_path: Path):
    _save(tmp_path, 5)
    (tmp_path / ".tmp-step-0000010-123").mkdir()           # a kill mid-save leaves only a temp folder
    (tmp_path / "step-0000011").mkdir()                     # or a folder without state.json
    assert ckpt.latest(tmp_path).name == "step-0000005"


def test_resave_same_step_replaces_atomically(tmp_path: Path):
    _save(tmp_path, 4)
    _save(tmp_path, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]


def test_corrupt_checkpoint_is_one_clear_error(tmp_path: Path):
    path = _save(tmp_path, 2)
    (path / "trainable-student.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FewstepError, match="is corrupt .*delete it and resume from an earlier checkpoint"):
        ckpt.load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(FewstepError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(path)


def test_pickles_that_are_not_plain_data_are_refused(tmp_path: Path):
    """Optimizer/RNG files load with weights_only=True, so an arbitrary object cannot execute on load."""
    path = _save(tmp_path, 1)
    torch.save({"x": Path("/etc")}, path / "rng.pt")
    with pytest.raises(FewstepError, match="corrupt"):
        ckpt.load_checkpoint(path)


def test_resolve_resume(tmp_path: Path):
    assert ckpt.resolve_resume("", tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path) is None     # nothing yet: a fresh start
    with pytest.raises(FewstepError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    _save(tmp_path / "checkpoints", 3)
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-0000003"
    assert json.loads((tmp_path / "checkpoints" / "step-0000003" / "state.json").read_text())["step"] == 3
