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
