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


def test_damaged_checkpoint_is_one_line_naming_the_previous_good_one(tmp_path: Path):
    older = _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    weights = path / "trainable-student.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])                     # truncated: found by its size
    with pytest.raises(FewstepError, match=rf"step-0000002 is damaged \(trainable-student.safetensors has {size // 2} "
                                           rf"bytes, {size} were written\); resume from the previous one with "
                                           rf"resume={older}"):
        ckpt.load_checkpoint(path)
    weights.write_bytes(b"x" * size)                                            # same size, garbage: found on load
    with pytest.raises(FewstepError, match=r"is damaged \(corrupt: .*resume from the previous one"):
        ckpt.load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(FewstepError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(path)
    only = _save(tmp_path / "alone", 3)
    (only / "rng.pt").unlink()
    with pytest.raises(FewstepError, match="rng.pt is missing.*no earlier checkpoint exists: start a new output_dir"):
        ckpt.verify_checkpoint(only)


def test_pickles_that_are_not_plain_data_are_refused(tmp_path: Path):
    """Optimizer/RNG files load with weights_only=True, so an arbitrary object cannot execute on load (even in a
    checkpoint whose manifest was rewritten to match)."""
    path = _save(tmp_path, 1)
    torch.save({"x": Path("/etc")}, path / "rng.pt")
    state = json.loads((path / "state.json").read_text())
    state["files"]["rng.pt"] = (path / "rng.pt").stat().st_size
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(FewstepError, match="corrupt"):
        ckpt.load_checkpoint(path)


def test_a_full_disk_while_saving_keeps_earlier_checkpoints(tmp_path: Path, monkeypatch):
    import errno

    first = _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(FewstepError) as err:
        _save(tmp_path, 2, keep=1)
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint step 2 was not saved" in msg and "No space left on device" in msg
    assert f"the newest complete checkpoint is still {first}" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001"]              # no temporary folder left
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_stale_temporary_folders_of_a_killed_save_are_removed(tmp_path: Path):
    (tmp_path / ".tmp-step-0000004-999").mkdir(parents=True)
    (tmp_path / ".old-step-0000002-999").mkdir()
    _save(tmp_path, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000005"]


def test_resolve_resume(tmp_path: Path):
    assert ckpt.resolve_resume("", tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path) is None     # nothing yet: a fresh start
    with pytest.raises(FewstepError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    _save(tmp_path / "checkpoints", 3)
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-0000003"
    assert json.loads((tmp_path / "checkpoints" / "step-0000003" / "state.json").read_text())["step"] == 3
