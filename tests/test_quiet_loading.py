"""Loading a teacher prints nothing: no `torch_dtype` deprecation, no loading progress bars, no safety-checker
paragraph (the shipped toy teacher has no safety checker and says it needs none)."""
import json
import warnings
from pathlib import Path

import pytest

import fewstep

NOISE = ("torch_dtype", "safety", "Loading pipeline components", "Loading weights")


@pytest.fixture
def loud_diffusers(monkeypatch):
    """Warnings on, as a user's shell has them (tests/conftest.py sets DIFFUSERS_VERBOSITY=error); restored after."""
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "warning")
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    yield
    diffusers_logging.set_verbosity(before)


def test_toy_teacher_loads_silently(loud_diffusers, capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from fewstep.models.teacher import load_teacher

    bars = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as caught:   # pytest would otherwise swallow a FutureWarning
        warnings.simplefilter("always")
        teacher = load_teacher("toy-digits")
    printed = capfd.readouterr()
    assert not [str(w.message) for w in caught if "dtype" in str(w.message)]
    assert teacher.pipe.safety_checker is None
    for text in NOISE:
        assert text not in printed.out and text not in printed.err, f"{text!r} printed while loading"
    assert (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()) == bars


def test_toy_asset_declares_no_safety_checker():
    index = json.loads((Path(fewstep.__file__).parent / "assets" / "toy-digits" / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
