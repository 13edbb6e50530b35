"""The denoising network's attention kernel: PyTorch's own choice (sdpa), one pinned SDPA kernel (flash,
efficient, math) or xformers, set per attention module through diffusers' processors.

Only the denoiser changes: the text encoders keep PyTorch's choice (flash takes no attention mask, and CLIP's
text encoder passes one). Pinning goes through processors rather than a wrapped `forward`, so a full student or
critic deep-copied from the teacher inside the block keeps its own, correct, pinned processors.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from fewstep.errors import FewstepError

BACKENDS = ("sdpa", "flash", "efficient", "math", "xformers")
CUDA_ONLY = ("flash", "efficient", "xformers")


class PinnedKernel:
    """An attention processor that runs the wrapped one with `scaled_dot_product_attention` pinned to `kernel`."""

    def __init__(self, inner: Any, kernel: Any) -> None:
        self.inner, self.kernel = inner, kernel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.kernel):
            return self.inner(*args, **kwargs)


def set_attention_backend(net: nn.Module, backend: str) -> ContextManager[None]:
    """A context manager: inside it `net` attends with `backend`; its own processors come back afterwards.
    CUDA-only backends on a machine without CUDA, and an xformers that cannot run here, fail with the fix."""
    if backend not in BACKENDS:
        raise FewstepError(f"attention={backend!r} is not one of {list(BACKENDS)}")
    if backend == "sdpa":
        return nullcontext()
    if backend in CUDA_ONLY and not torch.cuda.is_available():
        raise FewstepError(f"attention={backend} needs CUDA, which is not available here; use attention=sdpa or "
                           "attention=math")
    if not hasattr(net, "set_attn_processor"):
        raise FewstepError(f"attention={backend}: {type(net).__name__} has no diffusers attention processors to "
                           "set; use attention=sdpa")
    if backend == "xformers":
        return xformers_attention(net)
    from torch.nn.attention import SDPBackend

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "math": SDPBackend.MATH}[backend]
    return pinned_kernel(net, kernel)


@contextmanager
def restored_processors(net: nn.Module) -> Iterator[dict[str, Any]]:
    """The network's attention processors (yielded), put back when the block ends whatever it swapped in."""
    saved = dict(net.attn_processors)
    try:
        yield saved
    finally:
        net.set_attn_processor(saved)


@contextmanager
def pinned_kernel(net: nn.Module, kernel: Any) -> Iterator[None]:
    with restored_processors(net) as saved:
        net.set_attn_processor({name: PinnedKernel(proc, kernel) for name, proc in saved.items()})
        yield


def check_xformers() -> None:
    """Run one tiny bf16 xformers attention on the GPU: a wheel built for another torch imports fine but has no
    kernels, and would otherwise fail deep inside the first forward."""
    try:
        import xformers
        import xformers.ops as xops

        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
    except ImportError as exc:
        raise FewstepError(f"attention=xformers needs the xformers package ({exc}); pip install 'fewstep[xformers]' "
                           "or use attention=sdpa") from exc
    except Exception as exc:  # noqa: BLE001 - any kernel failure means the same fix
        raise FewstepError(f"attention=xformers: xformers {xformers.__version__} has no working kernel for torch "
                           f"{torch.__version__} here ({str(exc).splitlines()[0][:80]}); install the xformers build "
                           "made for this torch, or use attention=efficient (PyTorch's memory-efficient kernel)") from exc


@contextmanager
def xformers_attention(net: nn.Module) -> Iterator[None]:
    """diffusers' xformers processors inside the block, the network's own processors restored after it."""
    check_xformers()
    with restored_processors(net):
        try:
            net.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise FewstepError(f"attention=xformers failed ({exc}); pip install 'fewstep[xformers]'") from exc
        yield
