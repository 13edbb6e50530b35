import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny test models: one thread avoids OpenMP spin-waits when the 2 cores are shared


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random-init StableDiffusionPipeline saved once per session (a teacher folder, as users pass)."""
    from tiny_pipelines import tiny_sd

    path = tmp_path_factory.mktemp("teacher") / "tiny-sd"
    tiny_sd().save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts from a fresh accelerate state, as a new process would: on a CUDA machine a test that ran
    `Accelerator()` (CUDA) would otherwise make a later `Accelerator(cpu=True)` raise."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
