"""Run `fewstep bench` on one model under several settings (precision, weights dtype, attention kernel,
torch.compile, CUDA graphs) and write one comparison table; each variant's full bench.json goes to its own folder.

    python scripts/bench_variants.py /tmp/sd15-shape --steps 4,25 --batch-sizes 1,4 \\
        --variant "fp32=precision=fp32" --variant "bf16 autocast=" --variant "bf16 weights=dtype=bfloat16" \\
        --variant "bf16 weights, flash=dtype=bfloat16,attention=flash" \\
        --out docs/bench/gpu-sd15 --results docs/results.md --section gpu-sd15-variants

A variant is NAME=KEY=VALUE,KEY=VALUE with keys from `fewstep.bench.BenchOptions` (precision, dtype, attention,
compile, cuda_graphs, compare_stock, repeats, warmup, guidance, stub_network). A variant that fails (a kernel the
GPU or the installed packages lack) is reported as failed with its error, and the others still run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from fewstep.bench import BenchOptions, BenchRow, run_bench
from fewstep.bench.report import describe_env, write_results
from fewstep.bench.run import parse_int_list
from fewstep.errors import FewstepError
from fewstep.metrics.toy_report import write_section

FIELDS = {f.name: f for f in dataclasses.fields(BenchOptions)}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'bf16, flash=dtype=bfloat16,attention=flash' -> ('bf16, flash', {'dtype': 'bfloat16', 'attention': 'flash'})."""
    name, _, spec = text.partition("=")
    settings: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in FIELDS or key in ("prompts", "device", "progress"):
            raise SystemExit(f"error: variant {name!r}: unknown setting {key!r}; use {sorted(FIELDS)}")
        kind = FIELDS[key].type
        if "bool" in str(kind):
            settings[key] = value.lower() in ("1", "true", "yes", "on")
        elif "int" in str(kind):
            settings[key] = int(value)
        elif "float" in str(kind):
            settings[key] = float(value)
        else:
            settings[key] = value
    if not name.strip():
        raise SystemExit(f"error: variant {text!r} has no name; write NAME=KEY=VALUE,...")
    return name.strip(), settings


def release_memory() -> None:
    """Free the last variant's model before the next loads, so each variant's peak memory is its own (pipelines
    hold reference cycles that only the collector frees)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"


def table(results: list[tuple[str, dict[str, Any], list[BenchRow] | str]]) -> str:
    """One row per variant x (steps, batch): latency, throughput, memory, speedup over the first variant."""
    first = next((rows for _, _, rows in results if not isinstance(rows, str)), [])
    base = {(r.steps, r.batch): r.engine.ms_per_image for r in first}
    lines = ["| variant | steps | batch | NFE | ms/image (median) | IQR ms/image | images/s | peak mem MB | "
             "speedup vs first | stock ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _, rows in results:
        if isinstance(rows, str):
            lines.append(f"| {name} | – | – | – | failed: {rows} | | | | | |")
            continue
        for r in rows:
            e = r.engine
            ref = base.get((r.steps, r.batch))
            speed = "–" if ref is None else f"{ref / e.ms_per_image:.2f}×"
            ratio = "–" if r.stock_ratio is None else f"{r.stock_ratio:.2f}"
            lines.append(f"| {name} | {r.steps} | {r.batch} | {e.nfe:g} | {e.ms_per_image:.2f} | "
                         f"{e.ms_per_image_iqr:.2f} | {e.images_per_s:.2f} | {e.memory.peak_mb:.0f} | {speed} | "
                         f"{ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--steps", default="4")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--variant", action="append", required=True, help="NAME=KEY=VALUE,... (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (GPU clocks ramp up, cuDNN tunes)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", required=True, type=Path, help="one sub-folder per variant with bench.json/bench.md")
    ap.add_argument("--results", type=Path, default=None, help="markdown file to write the table into")
    ap.add_argument("--section", default="bench-variants")
    args = ap.parse_args(argv)
    steps, batches = parse_int_list(args.steps, "--steps"), parse_int_list(args.batch_sizes, "--batch-sizes")
    variants = [parse_variant(v) for v in args.variant]
    if len({slug(n) for n, _ in variants}) != len(variants):
        raise SystemExit("error: two variants share a name; name each one differently")
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; pass a new --out", file=sys.stderr)
        return 2
    results: list[tuple[str, dict[str, Any], list[BenchRow] | str]] = []
    for name, settings in variants:
        opts = dataclasses.replace(BenchOptions(repeats=args.repeats, warmup=args.warmup, guidance=args.guidance,
                                               device=args.device, progress=False),
                                   **settings)
        print(f"== {name}: {settings}", flush=True)
        try:
            rows = run_bench(args.model, steps, batches, opts)
        except Exception as exc:  # noqa: BLE001 - a failed variant is a result, reported in the table
            if not isinstance(exc, FewstepError):
                traceback.print_exc()
            print(f"variant {name!r} failed: {exc}", file=sys.stderr, flush=True)
            results.append((name, settings, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
            release_memory()
            continue
        write_results(rows, args.out / slug(name))
        print(describe_env(rows), flush=True)
        results.append((name, settings, rows))
        release_memory()
    ok = [rows for _, _, rows in results if not isinstance(rows, str)]
    env = ok[0][0].env if ok and ok[0] else {}
    command = "python scripts/bench_variants.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"Written by `{command}`.\n\n{env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
              f"diffusers {env.get('diffusers', '?')}, model `{Path(args.model).name}`; {args.repeats} timed runs "
              f"per case after {args.warmup} warm-up runs (more with compile: see each bench.json); memory = {'CUDA max allocated' if env.get('device', '').startswith('cuda') else 'process RSS'}; "
              f"speedup = first variant's ms/image over this one's at the same steps and batch; stock ratio = stock "
              f"Diffusers call median / engine median. Variant settings: "
              + "; ".join(f"**{n}**: {json.dumps(s) if s else 'defaults'}" for n, s, _ in results)
              + f". Raw timings: `{args.out}/<variant>/bench.json`.\n\n")
    body = header + table(results)
    print(body)
    if args.results is not None:
        write_section(args.results, args.section, body)
        print(f"wrote section {args.section} of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
