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


@pytest.fixture
def one_thread():
    """Tiny tensors: on an oversubscribed 2-core box two intra-op threads make each transcendental op ~100x slower
    (measured 12 ms vs 0.1 ms for a 1000-element log), so modules of tiny-tensor math run single-threaded
    (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
