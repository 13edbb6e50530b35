"""The `fewstep bench` driver: validate the settings, load the model, build the cases, measure, report."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from fewstep.bench.measure import Case, Measurement, count_case, current_memory_mb, time_case
from fewstep.bench.report import (RESULTS_JSON, RESULTS_MD, BenchRow, describe_env, make_row,
                                  markdown_table, write_results)
from fewstep.bench.sides import (bench_prompts, compile_net, engine_side, grid_for, net_autocast, stock_scheduler,
                                 stock_setup_note, stock_side, stub_network)
from fewstep.cli_args import int_list as parse_int_list
from fewstep.cli_args import pick_device
from fewstep.errors import FewstepError
from fewstep.paths import claim_output, read_sidecar, staged_output
from fewstep.models.attention import CUDA_ONLY, set_attention_backend
from fewstep.models.teacher import DTYPES, Teacher
from fewstep.recipes.base import InferenceSpec
from fewstep.sample import precision_dtype, resolve_model

BUSY_LOAD_PER_CORE = 0.5   # a 1-minute load average above this x cores: something else is running


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
    dtype: str = "float32"              # weights: float32 / bfloat16 / float16 (the stock `torch_dtype`)
    attention: str = "sdpa"             # sdpa / math; flash / efficient / xformers need CUDA
    compile: bool = False               # torch.compile the denoising network (CUDA only)
    cuda_graphs: bool = False           # torch.compile(mode="reduce-overhead") (CUDA only)
    prompts: list[str] | str | None = None  # prompts (cycled) or a text file; None: fixed built-in prompts
    seed: int = 0                       # image i of a batch uses seed + i
    progress: bool = True               # tqdm bar on stderr
    stub_network: bool = False          # the network returns its input: times loop, encoding and decoding only
    threads: int | None = None          # torch.set_num_threads for the run (None: torch's default)


def validate(steps: list[int], batch_sizes: list[int], opts: BenchOptions, device: str) -> None:
    """Refuse bad settings before anything is loaded (CUDA-only switches on a CPU run, empty lists)."""
    if not steps or not batch_sizes or min(steps) < 1 or min(batch_sizes) < 1:
        raise FewstepError("--steps and --batch-sizes need positive integers, e.g. --steps 1,4 --batch-sizes 1,8")
    if opts.repeats < 1 or opts.warmup < 1:
        raise FewstepError("--repeats and --warmup must be >= 1 (the first warm-up run also counts network calls)")
    if opts.threads is not None and opts.threads < 1:
        raise FewstepError(f"--threads {opts.threads} must be >= 1; pass e.g. --threads 1")
    if opts.dtype not in DTYPES:
        raise FewstepError(f"--dtype {opts.dtype!r} is not one of {sorted(DTYPES)}; pass e.g. --dtype bfloat16")
    if opts.stub_network and (opts.compile or opts.cuda_graphs):
        raise FewstepError("--stub-network times the code around the network, so compiling the network means "
                           "nothing there; drop --compile/--cuda-graphs or --stub-network")
    if device.startswith("cuda"):
        if opts.attention == "flash" and opts.precision == "fp32" and opts.dtype == "float32":
            raise FewstepError("flash attention runs in bf16/fp16 only; drop --precision fp32 (auto is bf16 on "
                               "CUDA), pass --dtype bfloat16, or use --attention efficient")
        return
    flags = [("--compile", opts.compile), ("--cuda-graphs", opts.cuda_graphs),
             ("--precision bf16", opts.precision == "bf16"),
             (f"--attention {opts.attention}", opts.attention in CUDA_ONLY)]
    for flag, on in flags:
        if on:
            raise FewstepError(f"{flag} needs a CUDA device but this run is on {device}; drop it (CPU runs use "
                               "fp32, sdpa or math attention, no compilation)")


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


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def load_warning(load: float | None, cores: int | None) -> str | None:
    """One line when the machine is busy (load above BUSY_LOAD_PER_CORE x cores), else None."""
    if load is None or not cores or load <= BUSY_LOAD_PER_CORE * cores:
        return None
    return (f"warning: load average {load:.1f} on {cores} cores: another job is running, timings will be noisy; "
            "run benchmarks alone")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block (nothing when n is None), the previous count restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


def environment(device: str, teacher: Teacher, autocast: torch.dtype | None, opts: BenchOptions, warmup: int,
                compile_mode: str | None, loaded_mb: float, load: float | None) -> dict[str, Any]:
    """What the numbers depend on: hardware, library versions, threads, dtypes, switches."""
    import diffusers

    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(),
           "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
           "threads_requested": opts.threads, "load_average_1m": load,
           "net_dtype": str(next(teacher.net.parameters()).dtype).replace("torch.", ""),
           "autocast_dtype": None if autocast is None else str(autocast).replace("torch.", ""),
           "precision": opts.precision, "weights_dtype": opts.dtype, "attention": opts.attention, "compile": compile_mode,
           "stub_network": opts.stub_network,
           "warmup": warmup, "repeats": opts.repeats, "seed": opts.seed,
           "memory": "cuda_max_allocated" if device.startswith("cuda") else "cpu_rss",
           "memory_after_load_mb": loaded_mb}
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
    return env


def cast_weights(teacher: Teacher, spec: InferenceSpec, dtype: str) -> None:
    """Every component (and every full phase expert) in `dtype`, as `from_pretrained(torch_dtype=...)` gives."""
    if dtype == "float32":
        return
    teacher.pipe.to(dtype=DTYPES[dtype])
    for net in spec.networks(teacher.net):
        net.to(dtype=DTYPES[dtype])


def check_stock_supported(spec: InferenceSpec) -> None:
    if spec.experts:
        raise FewstepError("--compare-stock does not support phased exports (the stock call needs per-step adapter "
                           "switching); bench it without --compare-stock")


def build_cases(teacher: Teacher, spec: InferenceSpec, meta: dict | None, step: str, guidance: float, steps: list[int],
                batch_sizes: list[int], prompts: list[str], seed: int, scheduler: Any | None) -> list[Case]:
    """Every steps x batch case with its engine side (and stock side when `scheduler` is given)."""
    denoiser = spec.wrap(teacher.denoiser())
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


def model_label(model: str) -> str:
    """A folder's name for the table, with its run folder when it is an `export` (runs/dmd2-toy/export ->
    dmd2-toy/export); a preset name as given."""
    path = Path(model)
    if not path.is_dir():
        return model
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name == "export" else path.name


def run_bench(model: str, steps: list[int], batch_sizes: list[int], options: BenchOptions | None = None,
              **overrides: Any) -> list[BenchRow]:
    """Benchmark MODEL (preset, pipeline folder or export folder) at every steps x batch size.

    Settings come from `options` (a BenchOptions), with keyword overrides of its fields, e.g.
    `run_bench("toy-digits", [1, 4], [1, 8], guidance=2.0, compare_stock=True, progress=False)`.
    """
    opts = replace(options or BenchOptions(), **overrides)
    device = pick_device(opts.device)
    validate(steps, batch_sizes, opts, device)
    with torch_threads(opts.threads):
        return bench_rows(model, steps, batch_sizes, opts, device)


def bench_rows(model: str, steps: list[int], batch_sizes: list[int], opts: BenchOptions,
               device: str) -> list[BenchRow]:
    """run_bench after validation: load, build the cases, warn when the machine is busy, time, collect rows."""
    teacher, spec, name = resolve_model(model, None, opts.guidance, device)
    cast_weights(teacher, spec, opts.dtype)
    meta = read_sidecar(Path(model)) if Path(model).is_dir() else None
    loaded_mb = current_memory_mb(device)
    if opts.compare_stock:
        check_stock_supported(spec)
    autocast = precision_dtype(opts.precision, device)
    teacher.autocast_dtype = autocast
    compile_mode = ("reduce-overhead" if opts.cuda_graphs else "default") if opts.compile or opts.cuda_graphs else None
    warmup = max(opts.warmup, {None: 1, "default": 2, "reduce-overhead": 3}[compile_mode])
    prompts = bench_prompts(opts.prompts, max(batch_sizes), name)
    scheduler = stock_scheduler(teacher, meta) if opts.compare_stock else None
    cases = build_cases(teacher, spec, meta, spec.step, spec.guidance_scale, steps, batch_sizes, prompts, opts.seed,
                        scheduler)
    load = load_average()
    warning = load_warning(load, os.cpu_count())
    if warning:
        print(warning, file=sys.stderr)
    with set_attention_backend(teacher.net, opts.attention), net_autocast(teacher.net, autocast), \
            stub_network(teacher.net, opts.stub_network):
        measured = measure_cases(cases, teacher.net, device, warmup, opts.repeats, compile_mode, opts.progress)
    env = environment(device, teacher, autocast, opts, warmup, compile_mode, loaded_mb, load)
    display = model_label(model)
    note = None if scheduler is None else stock_setup_note(meta, teacher, scheduler)
    return [make_row(display, name, case, m, spec.step, spec.guidance_scale, teacher.size, env, note)
            for case, m in zip(cases, measured)]


def run_bench_cli(args: Any) -> list[BenchRow]:
    """`fewstep bench`: parse the lists, refuse a used --out before any work (unless --overwrite), run, print, write
    (into a temporary folder renamed into place)."""
    steps = parse_int_list(args.steps, "--steps")
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")
    out = claim_output(args.out, "--out", getattr(args, "overwrite", False)) if args.out else None
    rows = run_bench(args.model, steps, batch_sizes, guidance=args.guidance, repeats=args.repeats,
                     warmup=args.warmup, compare_stock=args.compare_stock, device=args.device,
                     precision=args.precision, dtype=args.dtype, attention=args.attention, compile=args.compile,
                     cuda_graphs=args.cuda_graphs, prompts=args.prompts, seed=args.seed,
                     progress=not args.no_progress, stub_network=args.stub_network,
                     threads=getattr(args, "threads", None))
    print(describe_env(rows))
    print()
    print(markdown_table(rows), end="")
    if out is not None:
        with staged_output(out) as tmp:
            write_results(rows, tmp)
        print(f"wrote {out / RESULTS_JSON} and {out / RESULTS_MD}")
    if getattr(args, "results", None):
        from fewstep.metrics.toy_report import write_section

        command = "fewstep " + shlex.join(getattr(args, "argv", None) or ["bench", args.model])
        body = f"Written by `{command.strip()}`.\n\n{describe_env(rows)}\n\n{markdown_table(rows)}"
        write_section(Path(args.results), args.section or "bench", body)
        print(f"wrote section {args.section or 'bench'} of {args.results}")
    return rows
