"""Timing and memory machinery of `fewstep bench`: a `Side` is a timed callable, a `Case` one (steps, batch) point
with its sides; network calls are counted by a forward pre-hook, memory by the CUDA allocator or a sampled RSS."""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
from torch import Tensor, nn


RSS_INTERVAL_S = 0.002

MB = 1024 ** 2


@dataclass
class Stats:
    """Summary of timed runs, in seconds per batch (`runs_s` keeps every raw timing)."""

    runs_s: list[float]
    median_s: float
    min_s: float
    max_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    std_s: float

    @classmethod
    def of(cls, runs: list[float]) -> "Stats":
        a = np.asarray(runs, dtype=np.float64)
        q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        return cls(runs_s=[float(v) for v in a], median_s=med, min_s=float(a.min()), max_s=float(a.max()),
                   q1_s=q1, q3_s=q3, iqr_s=q3 - q1, std_s=std)


@dataclass
class Memory:
    """Peak memory over the timed runs of one side. kind: "cuda_max_allocated" or "cpu_rss"."""

    kind: str
    peak_mb: float
    baseline_mb: float
    increase_mb: float


@dataclass
class Measurement:
    """One side (engine or stock) of one (steps, batch) case."""

    latency: Stats             # seconds per batch
    forward_calls: int         # denoising-network calls per batch run
    forward_rows: int          # batch rows through the network per batch run (2 x batch per call with batched CFG)
    nfe: float                 # network evaluations per image = forward_rows / batch
    ms_per_image: float        # median latency / batch
    ms_per_image_iqr: float
    images_per_s: float        # batch / median latency
    memory: Memory


@dataclass
class Side:
    """A timed callable; `context` wraps each call without being timed (e.g. the stock scheduler swap)."""

    name: str
    call: Callable[[], Tensor]
    context: Callable[[], ContextManager[Any]] = nullcontext


@dataclass
class Case:
    steps: int
    batch: int
    times: list[float]
    sides: list[Side]


@dataclass
class ForwardCounter:
    """Forward pre-hook: counts network calls and the batch rows they receive."""

    calls: int = 0
    rows: int = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        x = batch_tensor(args, kwargs)
        self.rows += 0 if x is None else int(x.shape[0])


def batch_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The network input that carries the batch: the first positional tensor, else `sample`/`hidden_states`."""
    for a in args:
        if torch.is_tensor(a):
            return a
    for key in ("sample", "hidden_states", "x"):
        if torch.is_tensor(kwargs.get(key)):
            return kwargs[key]
    return next((v for v in kwargs.values() if torch.is_tensor(v)), None)


@contextmanager
def counting(net: nn.Module) -> Iterator[ForwardCounter]:
    """Count the calls of `net` inside the block."""
    counter = ForwardCounter()
    handle = net.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class RssSampler:
    """Peak resident set size of this process, sampled in a background thread while the block runs."""

    def __init__(self, interval: float = RSS_INTERVAL_S) -> None:
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self._stop = threading.Event()
        self.baseline = self.peak = 0

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "RssSampler":
        self.baseline = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class CudaPeak:
    """Peak allocated CUDA memory over the block (after resetting the peak statistics)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = self.peak = 0

    def __enter__(self) -> "CudaPeak":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = int(torch.cuda.memory_allocated(self.device))
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = int(torch.cuda.max_memory_allocated(self.device))


def current_memory_mb(device: str) -> float:
    """Memory in use now: CUDA memory allocated, or the process RSS."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device) / MB
    import psutil

    return psutil.Process().memory_info().rss / MB


def memory_probe(device: str) -> RssSampler | CudaPeak:
    return CudaPeak(device) if device.startswith("cuda") else RssSampler()


def run_once(side: Side, device: str) -> None:
    """One untimed run."""
    with side.context(), torch.no_grad():
        side.call()
    synchronize(device)


def timed_run(side: Side, device: str) -> tuple[float, int, int]:
    """(seconds, baseline bytes, peak bytes) of one call; the memory probe and the context are outside the timing."""
    with side.context(), torch.no_grad(), memory_probe(device) as mem:
        synchronize(device)
        start = perf_counter()
        side.call()
        synchronize(device)
        elapsed = perf_counter() - start
    return elapsed, mem.baseline, mem.peak


def probe_counts(side: Side, net: nn.Module, device: str) -> ForwardCounter:
    """One run with the network's calls counted."""
    with counting(net) as counter:
        run_once(side, device)
    return counter


def summarise(runs: list[tuple[float, int, int]], counter: ForwardCounter, batch: int, device: str) -> Measurement:
    latency = Stats.of([r[0] for r in runs])
    baseline, peak = min(r[1] for r in runs), max(r[2] for r in runs)
    memory = Memory(kind="cuda_max_allocated" if device.startswith("cuda") else "cpu_rss", peak_mb=peak / MB,
                    baseline_mb=baseline / MB, increase_mb=max(peak - baseline, 0) / MB)
    return Measurement(latency=latency, forward_calls=counter.calls, forward_rows=counter.rows,
                       nfe=counter.rows / batch, ms_per_image=1000 * latency.median_s / batch,
                       ms_per_image_iqr=1000 * latency.iqr_s / batch, images_per_s=batch / latency.median_s,
                       memory=memory)


def time_case(case: Case, counts: dict[str, ForwardCounter], warmups: int, repeats: int, device: str,
              bar: Any) -> dict[str, Measurement]:
    """Warm-ups per side, then timed runs alternating between the sides."""
    for side in case.sides:
        for _ in range(warmups):
            run_once(side, device)
            bar.update(1)
    gc.collect()
    runs: dict[str, list[tuple[float, int, int]]] = {s.name: [] for s in case.sides}
    for _ in range(repeats):
        for side in case.sides:
            runs[side.name].append(timed_run(side, device))
            bar.update(1)
    return {s.name: summarise(runs[s.name], counts[s.name], case.batch, device) for s in case.sides}


def count_case(case: Case, net: nn.Module, device: str, bar: Any) -> dict[str, ForwardCounter]:
    counts = {}
    for side in case.sides:
        counts[side.name] = probe_counts(side, net, device)
        bar.update(1)
    return counts
