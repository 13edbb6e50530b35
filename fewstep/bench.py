"""`fewstep bench MODEL`: latency, throughput, peak memory and network evaluations of full text-to-image generation
(prompt encoding + denoising loop + VAE decode) through the sampling engine, optionally against the stock Diffusers
pipeline call on the same model, batch, steps, guidance, resolution and seeds.

Protocol, per (steps, batch) case and per side (engine, stock):

* a probe run with a forward pre-hook on the denoising network counts its calls and batch rows (NFE per image =
  rows / batch, so batched CFG counts 2 per step). Without compilation the probe is the first warm-up run; with
  `--compile`/`--cuda-graphs` every probe runs eagerly before the network is compiled (compilation does not change
  how often the network is called), and all warm-up runs are compiled ones;
* the remaining warm-up runs, then `repeats` timed runs. Engine and stock runs alternate, so drift on a shared
  machine hits both sides alike. CUDA is synchronised before and after each timed call;
* memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (baseline: memory allocated
  just before the call); on CPU the process RSS, sampled by a background thread every 2 ms during each timed call
  (baseline: RSS just before the call, after the warm-ups, so memory the allocator kept from them is not counted
  again). Peak = max over the timed runs; increase = peak - smallest baseline. `env.memory_after_load_mb` records
  the same measure right after the model was loaded, before any run.

Both sides do the same work: the same prompts and per-image seeds (image i of a batch uses seed + i, identical in
every repeat), the same guidance and resolution, decoding to a [0, 1] tensor that stays on the device (the stock
call uses `output_type="pt"`); the stock pipeline's progress bar, safety checker and watermarker are switched off,
and bf16 autocast (CUDA) wraps the denoising network alone on both sides. A teacher runs the engine's DDIM/Euler
grid against the pipeline's own scheduler; an export runs its recorded sampler against the recorded stock scheduler
with `timesteps=` (or `sigmas=`). Stock NFE is counted too; a ratio computed over unequal work is flagged.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import wraps
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewstep.errors import FewstepError
from fewstep.export import read_sidecar
from fewstep.models.teacher import Teacher, set_attention_backend
from fewstep.sample import GRAYSCALE_TEACHERS, precision_dtype, resolve_model
from fewstep.sampling.engine import seed_generators
from fewstep.sampling.generate import generate_latents

RESULTS_JSON = "bench.json"
RESULTS_MD = "bench.md"
CUDA_ONLY_ATTENTION = ("flash", "efficient", "xformers")
RSS_INTERVAL_S = 0.002
MB = 1024 ** 2
DEFAULT_PROMPTS = [
    "a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table", "an astronaut riding a horse on the moon",
    "a cozy reading nook with a cat", "a futuristic city skyline at night",
    "a close-up of a hummingbird drinking nectar", "a mountain lake reflecting pine trees",
]


@dataclass
class BenchOptions:
    """How to run the benchmark (everything except the model, steps and batch sizes)."""

    guidance: float | None = None       # CFG scale; None: the export's, or 1.0 (off) for a teacher
    repeats: int = 5                    # timed runs per case and side
    warmup: int = 1                     # untimed runs first (the first also counts network calls); at least 2
                                        # with compile, 3 with CUDA graphs (the number used is in env["warmup"])
    compare_stock: bool = False         # also time the stock Diffusers pipeline call
    device: str | None = None           # cpu / cuda / cuda:1 (default: cuda when available)
    precision: str = "auto"             # auto (bf16 autocast on CUDA) / fp32 / bf16 (CUDA only)
    attention: str = "sdpa"             # sdpa / math; flash / efficient / xformers need CUDA
    compile: bool = False               # torch.compile the denoising network (CUDA only)
    cuda_graphs: bool = False           # torch.compile(mode="reduce-overhead") (CUDA only)
    prompts: list[str] | str | None = None  # prompts (cycled) or a text file; None: fixed built-in prompts
    seed: int = 0                       # image i of a batch uses seed + i
    progress: bool = True               # tqdm bar on stderr


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
class BenchRow:
    """Results for one (steps, batch) case; `stock_ratio` = stock median / engine median (>= 1: engine no slower)."""

    model: str
    teacher: str
    steps: int
    batch: int
    guidance: float
    resolution: int
    sampler: str
    times: list[float]
    engine: Measurement
    stock: Measurement | None = None
    stock_ratio: float | None = None
    stock_setup: str | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> float:
        return self.engine.nfe

    @property
    def same_work(self) -> bool:
        """True when the stock call put exactly as many rows through the network as the engine."""
        return self.stock is None or (self.stock.forward_rows == self.engine.forward_rows
                                      and self.stock.forward_calls == self.engine.forward_calls)


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


# --- validation and setup -------------------------------------------------------------------------------------

def parse_int_list(text: str, flag: str) -> list[int]:
    """'1,4,50' -> [1, 4, 50]; anything else is a FewstepError naming the flag."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise FewstepError(f"{flag} {text!r} is not a comma-separated list of positive integers; "
                           f"pass e.g. {flag} 1,4,50")
    return values


def pick_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FewstepError(f"--device {device} but CUDA is not available here; use --device cpu")
    return device


def validate(steps: list[int], batch_sizes: list[int], opts: BenchOptions, device: str) -> None:
    """Refuse bad settings before anything is loaded (CUDA-only switches on a CPU run, empty lists)."""
    if not steps or not batch_sizes or min(steps) < 1 or min(batch_sizes) < 1:
        raise FewstepError("--steps and --batch-sizes need positive integers, e.g. --steps 1,4 --batch-sizes 1,8")
    if opts.repeats < 1 or opts.warmup < 1:
        raise FewstepError("--repeats and --warmup must be >= 1 (the first warm-up run also counts network calls)")
    if device.startswith("cuda"):
        return
    flags = [("--compile", opts.compile), ("--cuda-graphs", opts.cuda_graphs),
             ("--precision bf16", opts.precision == "bf16"),
             (f"--attention {opts.attention}", opts.attention in CUDA_ONLY_ATTENTION)]
    for flag, on in flags:
        if on:
            raise FewstepError(f"{flag} needs a CUDA device but this run is on {device}; drop it (CPU runs use "
                               "fp32, sdpa or math attention, no compilation)")


def bench_prompts(prompts: list[str] | str | None, n: int, teacher_name: str) -> list[str]:
    """n fixed prompts: the given ones (or a file's lines) cycled, digit prompts for the toy teacher, else a
    built-in list."""
    if isinstance(prompts, str):
        from fewstep.data.datasets import read_prompts

        prompts = read_prompts(prompts)
    if prompts is None and teacher_name in GRAYSCALE_TEACHERS:
        from fewstep.data.digits import class_balanced_prompts

        return class_balanced_prompts(n)
    pool = list(prompts) if prompts else DEFAULT_PROMPTS
    return [pool[i % len(pool)] for i in range(n)]


def grid_for(teacher: Teacher, meta: dict | None, steps: int) -> list[float]:
    """The engine's time grid at `steps` (as `fewstep sample` picks it): the export's own grid at its step count,
    the default student grid otherwise; a teacher's DDIM/Euler grid."""
    if meta is None:
        return [float(t) for t in teacher.teacher_times(steps)]
    if steps == len(meta["times"]) - 1:
        return [float(t) for t in meta["times"]]
    return [float(t) for t in teacher.student_times(steps)]


@contextmanager
def net_autocast(net: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast around the network's forward only (what the engine's Denoiser does), so the stock pipeline's text
    encoder and VAE stay in their own dtype exactly as the engine's do."""
    if dtype is None:
        yield
        return
    inner = net.forward

    @wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", dtype=dtype):
            return inner(*args, **kwargs)

    net.forward = forward
    try:
        yield
    finally:
        del net.forward


def compile_net(net: nn.Module, mode: str) -> None:
    """Compile the denoising network in place (the engine and the stock pipeline share it); "reduce-overhead"
    captures CUDA graphs."""
    net.compile(mode=mode)


# --- the two sides ----------------------------------------------------------------------------------------------

def engine_side(teacher: Teacher, denoiser: nn.Module, times: list[float], step: str, guidance: float,
                prompts: list[str], seeds: list[int]) -> Side:
    """Prompt encoding + engine loop + the family's VAE decode, images left on the device."""
    grid = torch.tensor(times, dtype=torch.float64)

    def call() -> Tensor:
        lat = generate_latents(teacher, denoiser, teacher.net, prompts, seeds, grid, step, guidance)
        return teacher.family.decode(teacher.pipe, lat)

    return Side("engine", call)


def stock_kwargs(teacher: Teacher, meta: dict | None, times: list[float]) -> dict[str, Any]:
    """Extra pipeline arguments: none for a teacher (its own scheduler), the recorded timesteps/sigmas for an
    export."""
    steps = len(times) - 1
    if meta is None:
        return {"num_inference_steps": steps}
    size = teacher.size
    grid = torch.tensor(times, dtype=torch.float64)
    return {"num_inference_steps": steps, **teacher.family.pipeline_call_kwargs(teacher.pipe, grid, size, size)}


def stock_scheduler(teacher: Teacher, meta: dict | None) -> Any:
    """The scheduler the stock call runs: the pipeline's own for a teacher, the recorded one for an export."""
    if meta is None:
        return teacher.pipe.scheduler
    import diffusers

    return getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])


@contextmanager
def stock_components(pipe: Any, scheduler: Any) -> Iterator[None]:
    """Swap in the stock scheduler and switch off work the engine does not do (safety checker, watermark)."""
    saved = {name: getattr(pipe, name) for name in ("scheduler", "safety_checker", "watermark")
             if getattr(pipe, name, None) is not None}
    pipe.scheduler = scheduler
    for name in ("safety_checker", "watermark"):
        if name in saved:
            setattr(pipe, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(pipe, name, value)


def stock_side(teacher: Teacher, meta: dict | None, scheduler: Any, times: list[float], guidance: float,
               prompts: list[str], seeds: list[int]) -> Side:
    """The stock pipeline call at equal steps, guidance, resolution and seeds, decoding to a tensor."""
    pipe, size = teacher.pipe, teacher.size
    kwargs = stock_kwargs(teacher, meta, times)
    pipe.set_progress_bar_config(disable=True)

    def call() -> Tensor:
        return pipe(prompt=prompts, guidance_scale=guidance, generator=seed_generators(seeds), height=size,
                    width=size, output_type="pt", **kwargs).images

    return Side("stock", call, lambda: stock_components(pipe, scheduler))


def stock_setup_note(meta: dict | None, teacher: Teacher, scheduler: Any) -> str:
    kind = "the export's recorded scheduler, explicit timesteps" if meta is not None else "the pipeline's own scheduler"
    return (f"{type(teacher.pipe).__name__}.__call__ with {type(scheduler).__name__} ({kind}), output_type='pt', "
            "progress bar / safety checker / watermark off")


# --- measuring --------------------------------------------------------------------------------------------------

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


# --- environment and the driver --------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, teacher: Teacher, autocast: torch.dtype | None, opts: BenchOptions, warmup: int,
                compile_mode: str | None, loaded_mb: float) -> dict[str, Any]:
    """What the numbers depend on: hardware, library versions, threads, dtypes, switches."""
    import diffusers

    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(),
           "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
           "net_dtype": str(next(teacher.net.parameters()).dtype).replace("torch.", ""),
           "autocast_dtype": None if autocast is None else str(autocast).replace("torch.", ""),
           "precision": opts.precision, "attention": opts.attention, "compile": compile_mode,
           "warmup": warmup, "repeats": opts.repeats, "seed": opts.seed,
           "memory": "cuda_max_allocated" if device.startswith("cuda") else "cpu_rss",
           "memory_after_load_mb": loaded_mb}
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
    return env


def check_stock_supported(teacher: Teacher) -> None:
    if teacher.experts:
        raise FewstepError("--compare-stock does not support phased exports (the stock call needs per-step adapter "
                           "switching); bench it without --compare-stock")


def build_cases(teacher: Teacher, meta: dict | None, step: str, guidance: float, steps: list[int],
                batch_sizes: list[int], prompts: list[str], seed: int, scheduler: Any | None) -> list[Case]:
    """Every steps x batch case with its engine side (and stock side when `scheduler` is given)."""
    denoiser = teacher.denoiser()
    cases = []
    for k in steps:
        times = grid_for(teacher, meta, k)
        for b in batch_sizes:
            p, s = prompts[:b], [seed + i for i in range(b)]
            sides = [engine_side(teacher, denoiser, times, step, guidance, p, s)]
            if scheduler is not None:
                sides.append(stock_side(teacher, meta, scheduler, times, guidance, p, s))
            cases.append(Case(steps=k, batch=b, times=times, sides=sides))
    return cases


def measure_cases(cases: list[Case], net: nn.Module, device: str, warmup: int, repeats: int, compile_mode: str | None,
                  progress: bool) -> list[dict[str, Measurement]]:
    """Count, warm up and time every case. With compilation all counting probes run eagerly first, then the network
    is compiled and every warm-up is a compiled run; without, each case's probe is its first warm-up."""
    probes = 1 if compile_mode else 0
    total = sum(len(c.sides) for c in cases) * (warmup + repeats + probes)
    out = []
    with tqdm(total=total, disable=not progress, desc="bench", unit="run") as bar:
        counts = [count_case(c, net, device, bar) for c in cases] if compile_mode else None
        if compile_mode:
            compile_net(net, compile_mode)
        for i, case in enumerate(cases):
            bar.set_postfix_str(f"{case.steps} steps, batch {case.batch}")
            case_counts = counts[i] if counts is not None else count_case(case, net, device, bar)
            out.append(time_case(case, case_counts, warmup - (0 if compile_mode else 1), repeats, device, bar))
    return out


def run_bench(model: str, steps: list[int], batch_sizes: list[int], options: BenchOptions | None = None,
              **overrides: Any) -> list[BenchRow]:
    """Benchmark MODEL (preset, pipeline folder or export folder) at every steps x batch size.

    Settings come from `options` (a BenchOptions), with keyword overrides of its fields, e.g.
    `run_bench("toy-digits", [1, 4], [1, 8], guidance=2.0, compare_stock=True, progress=False)`.
    """
    opts = replace(options or BenchOptions(), **overrides)
    device = pick_device(opts.device)
    validate(steps, batch_sizes, opts, device)
    teacher, spec, name = resolve_model(model, None, opts.guidance, device)
    meta = read_sidecar(Path(model)) if Path(model).is_dir() else None
    loaded_mb = current_memory_mb(device)
    if opts.compare_stock:
        check_stock_supported(teacher)
    autocast = precision_dtype(opts.precision, device)
    teacher.autocast_dtype = autocast
    compile_mode = ("reduce-overhead" if opts.cuda_graphs else "default") if opts.compile or opts.cuda_graphs else None
    warmup = max(opts.warmup, {None: 1, "default": 2, "reduce-overhead": 3}[compile_mode])
    prompts = bench_prompts(opts.prompts, max(batch_sizes), name)
    scheduler = stock_scheduler(teacher, meta) if opts.compare_stock else None
    cases = build_cases(teacher, meta, spec.step, spec.guidance_scale, steps, batch_sizes, prompts, opts.seed,
                        scheduler)
    with set_attention_backend(teacher.net, opts.attention), net_autocast(teacher.net, autocast):
        measured = measure_cases(cases, teacher.net, device, warmup, opts.repeats, compile_mode, opts.progress)
    env = environment(device, teacher, autocast, opts, warmup, compile_mode, loaded_mb)
    display = Path(model).name if Path(model).is_dir() else model
    note = None if scheduler is None else stock_setup_note(meta, teacher, scheduler)
    return [make_row(display, name, case, m, spec.step, spec.guidance_scale, teacher.size, env, note)
            for case, m in zip(cases, measured)]


def make_row(model: str, teacher_name: str, case: Case, m: dict[str, Measurement], sampler: str, guidance: float,
             resolution: int, env: dict[str, Any], stock_note: str | None) -> BenchRow:
    stock = m.get("stock")
    ratio = None if stock is None else stock.latency.median_s / m["engine"].latency.median_s
    return BenchRow(model=model, teacher=teacher_name, steps=case.steps, batch=case.batch, guidance=guidance,
                    resolution=resolution, sampler=sampler, times=case.times, engine=m["engine"], stock=stock,
                    stock_ratio=ratio, stock_setup=stock_note, env=env)


# --- reporting --------------------------------------------------------------------------------------------------

def _num(v: float, digits: int = 2) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.{digits}f}"


def markdown_table(rows: list[BenchRow]) -> str:
    """The results as a markdown table (plus a footnote when a stock call did different network work)."""
    head = ("| model | steps | batch | NFE | ms/image (median) | spread (IQR ms/image) | images/s | "
            "peak mem MB (+increase) | stock ratio |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r.engine
        ratio = "–" if r.stock_ratio is None else f"{r.stock_ratio:.2f}" + ("" if r.same_work else " †")
        lines.append(f"| {r.model} | {r.steps} | {r.batch} | {_num(e.nfe)} | {e.ms_per_image:.2f} | "
                     f"{e.ms_per_image_iqr:.2f} | {e.images_per_s:.2f} | "
                     f"{e.memory.peak_mb:.0f} (+{e.memory.increase_mb:.0f}) | {ratio} |")
    if not all(r.same_work for r in rows):
        lines.append("\n† the stock call ran a different number of network evaluations than the engine "
                     "(see stock.nfe in bench.json), so that ratio compares unequal work.")
    return "\n".join(lines) + "\n"


def describe_env(rows: list[BenchRow]) -> str:
    """One line naming the hardware, versions, threads, dtype and protocol of a run."""
    if not rows:
        return ""
    e, r = rows[0].env, rows[0]
    dtype = e["net_dtype"] + (f" + {e['autocast_dtype']} autocast" if e["autocast_dtype"] else "")
    mem = "CUDA max allocated" if e["memory"] == "cuda_max_allocated" else "process RSS"
    return (f"{e['device_name']} ({e['device']}), torch {e['torch']}, diffusers {e['diffusers']}, "
            f"{e['torch_threads']} threads, {dtype}, attention {e['attention']}, compile {e['compile'] or 'off'}; "
            f"guidance {_num(r.guidance)}, {r.resolution}px, sampler {r.sampler}; {e['warmup']} warm-up + "
            f"{e['repeats']} timed runs; memory = {mem}; stock ratio = stock median / engine median")


def results_json(rows: list[BenchRow]) -> dict[str, Any]:
    """Everything as plain data: the environment once, then every row with its raw timings."""
    out_rows = []
    for r in rows:
        d = asdict(r)
        d.pop("env")
        d["same_work"] = r.same_work
        out_rows.append(d)
    return {"env": rows[0].env if rows else {}, "rows": out_rows}


def check_out(out: Path) -> None:
    if (out / RESULTS_JSON).exists():
        raise FewstepError(f"{out} already holds {RESULTS_JSON}; pass a new --out or delete it first")


def write_results(rows: list[BenchRow], out: Path) -> Path:
    """bench.json (raw timings + summary) and bench.md (the table) under `out`; an existing bench.json is kept."""
    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / RESULTS_JSON, "x") as f:
            json.dump(results_json(rows), f, indent=2, allow_nan=False)
    except FileExistsError as exc:
        raise FewstepError(f"{out} already holds {RESULTS_JSON}; pass a new --out or delete it first") from exc
    (out / RESULTS_MD).write_text(f"# fewstep bench\n\n{describe_env(rows)}\n\n{markdown_table(rows)}")
    return out


def run_bench_cli(args: Any) -> list[BenchRow]:
    """`fewstep bench`: parse the lists, refuse an existing bench.json before any work, run, print, write."""
    steps = parse_int_list(args.steps, "--steps")
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out)
    rows = run_bench(args.model, steps, batch_sizes, guidance=args.guidance, repeats=args.repeats,
                     warmup=args.warmup, compare_stock=args.compare_stock, device=args.device,
                     precision=args.precision, attention=args.attention, compile=args.compile,
                     cuda_graphs=args.cuda_graphs, prompts=args.prompts, seed=args.seed,
                     progress=not args.no_progress)
    print(describe_env(rows))
    print()
    print(markdown_table(rows), end="")
    if out is not None:
        write_results(rows, out)
        print(f"wrote {out / RESULTS_JSON} and {out / RESULTS_MD}")
    if getattr(args, "results", None):
        from fewstep.metrics.toy_report import write_section

        command = "fewstep " + shlex.join(getattr(args, "argv", None) or ["bench", args.model])
        body = f"Written by `{command.strip()}`.\n\n{describe_env(rows)}\n\n{markdown_table(rows)}"
        write_section(Path(args.results), args.section or "bench", body)
        print(f"wrote section {args.section or 'bench'} of {args.results}")
    return rows
