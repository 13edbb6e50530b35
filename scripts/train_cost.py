"""What training runs cost: seconds per iteration, images per second and peak CUDA memory, read from each run's
metrics.jsonl and config.yaml, as one markdown table (optionally written into docs/results.md).

    python scripts/train_cost.py runs/dmd2-sd15-shape runs/lcm-sd15-shape --results docs/results.md --section gpu-train

The first logged window holds the warm-up (allocator growth, cuDNN autotuning), so the median leaves it out when
there are later windows.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fewstep.metrics.toy_report import write_section


def summarise(run: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(run / "config.yaml")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"error: {run}/metrics.jsonl is empty; train the run first")
    timed = rows[1:] or rows
    sec = statistics.median(r["sec_per_step"] for r in timed)
    peak = max((r.get("cuda_peak_gb", float("nan")) for r in rows), default=float("nan"))
    losses = sorted(k for k in rows[-1] if k.startswith("loss/"))
    return {"run": run.name, "recipe": cfg.recipe, "teacher": Path(str(cfg.teacher.pretrained)).name,
            "student": cfg.student.mode, "batch": int(cfg.data.batch_size),
            "resolution": cfg.teacher.resolution, "precision": cfg.train.mixed_precision,
            "weights": cfg.teacher.dtype, "attention": cfg.attention,
            "steps": int(rows[-1]["step"]), "sec_per_step": sec, "images_per_s": int(cfg.data.batch_size) / sec,
            "cuda_peak_gb": peak, "last_losses": {k: rows[-1][k] for k in losses}}


def table(items: list[dict[str, Any]]) -> str:
    lines = ["| run | recipe | teacher | student | batch | px | mixed precision | weights | attention | iterations | "
             "s / iteration (median) | images / s | peak CUDA GB | last losses |",
             "|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---|"]
    for s in items:
        losses = ", ".join(f"{k[5:]} {v:.3g}" for k, v in s["last_losses"].items())
        peak = "–" if s["cuda_peak_gb"] != s["cuda_peak_gb"] else f"{s['cuda_peak_gb']:.1f}"
        lines.append(f"| {s['run']} | {s['recipe']} | {s['teacher']} | {s['student']} | {s['batch']} | "
                     f"{s['resolution']} | {s['precision']} | {s['weights']} | {s['attention']} | {s['steps']} | "
                     f"{s['sec_per_step']:.3f} | {s['images_per_s']:.1f} | {peak} | {losses} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--section", default="train-cost")
    ap.add_argument("--note", default="", help="a sentence to put under the command (hardware, what was run)")
    args = ap.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file() or not (run / "config.yaml").is_file():
            print(f"error: {run} is not a fewstep run folder (no metrics.jsonl/config.yaml)", file=sys.stderr)
            return 2
    body = table([summarise(r) for r in args.runs])
    command = "python scripts/train_cost.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = f"Written by `{command}`.{' ' + args.note if args.note else ''}\n\n{body}"
    print(text)
    if args.results is not None:
        write_section(args.results, args.section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
