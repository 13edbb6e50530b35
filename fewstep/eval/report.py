"""Reports of `fewstep eval`: report.json, report.md, one sample grid per row and metric_vs_nfe.png.

Rows carry everything needed to read a number: model, steps, NFE, guidance, every metric, N and the seed range,
seconds per image (generation only, summed over processes, divided by N), the speedup against the slowest teacher
row (most steps) of the same protocol, and the full manifests of the reference statistics and the `describe()`
dicts of the CLIP scorer and rewards used.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.eval.scoring import slug

REPORT_JSON, REPORT_MD, PLOT = "report.json", "report.md", "metric_vs_nfe.png"
LOWER_IS_BETTER = ("fid", "kid")


@dataclass
class EvalRow:
    """One model at one step count under one protocol."""

    protocol: str
    protocol_label: str
    model: str
    label: str
    kind: str                      # "teacher" or "<recipe> student"
    teacher: str
    steps: int
    nfe: int                       # network evaluations per image (2 per step with batched CFG)
    guidance: float
    sampler: str
    resolution: int
    n: int
    seeds: tuple[int, int]         # first and last seed (image i uses seed + i)
    seconds_per_image: float       # generation + decode, summed over processes, / N
    main_metric: str               # key of `metrics` plotted against NFE
    metrics: dict[str, float]
    references: list[dict[str, Any]] = field(default_factory=list)   # {"where", "manifest"}
    scorers: dict[str, Any] = field(default_factory=dict)             # describe() dicts
    prompts_sha256: str = ""
    speedup: float | None = None   # seconds/image of the slowest teacher row / this row's
    grid: str | None = None        # sample grid PNG, relative to the report folder
    grid_images: Tensor | None = field(default=None, repr=False)      # uint8, not written to JSON

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("grid_images")
        d["seeds"] = list(self.seeds)
        d["metrics"] = {k: _finite(v) for k, v in self.metrics.items()}
        return d


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def add_speedups(rows: list[EvalRow]) -> None:
    """speedup = seconds/image of the protocol's teacher row with the most steps / the row's own."""
    for proto in {r.protocol for r in rows}:
        group = [r for r in rows if r.protocol == proto]
        teachers = [r for r in group if r.kind == "teacher"]
        base = max(teachers, key=lambda r: (r.steps, r.seconds_per_image), default=None)
        for r in group:
            r.speedup = base.seconds_per_image / r.seconds_per_image if base and r.seconds_per_image > 0 else None


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _arrow(key: str) -> str:
    """↓ for FID/KID, "(1 = real)" for diversity, ↑ for the other scores."""
    if key.endswith(("_std", "_subset")):
        return ""
    if key.split("[")[0].split("_")[0] in LOWER_IS_BETTER:
        return "↓"
    return "(1 = real)" if key == "diversity" else "↑"


def metric_keys(rows: list[EvalRow]) -> list[str]:
    """Metric names in order of first appearance (KID subset sizes left to the JSON)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.metrics if k not in keys and not k.endswith("_subset")]
    return keys


def reference_summary(ref: dict[str, Any]) -> str:
    m = ref["manifest"]
    desc = m.get("reference", {})
    what = {"digits": "all real digits", "folder": f"images in {desc.get('folder')}",
            "teacher": (f"teacher {desc.get('teacher')} samples ({desc.get('sampler')}, {desc.get('steps')} steps, "
                        f"w={desc.get('guidance')}, seeds {desc.get('seeds')})")}.get(desc.get("kind"), "?")
    return (f"reference: {what}, n={m.get('n')}, extractor {m.get('extractor')} (weights sha256 "
            f"{str(m.get('extractor_weights_sha256'))[:12]}), reference sha256 {str(m.get('reference_sha256'))[:12]}, "
            f"crop/resize {m.get('images')}; stats {ref.get('where')}")


def protocol_table(rows: list[EvalRow]) -> str:
    """Markdown table of one protocol's rows, with N, seeds, references and scorers under it."""
    keys = metric_keys(rows)
    head = ["model", "kind", "steps", "NFE", "guidance", *[f"{k} {_arrow(k)}".strip() for k in keys],
            "s / image", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r.model, r.kind, r.steps, r.nfe, _num(r.guidance), *[_num(r.metrics.get(k)) for k in keys],
                 f"{r.seconds_per_image * 1000:.2f} ms", "–" if r.speedup is None else f"{r.speedup:.1f}×"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    first = rows[0]
    notes = [f"N = {first.n} images per row, seeds {first.seeds[0]}..{first.seeds[1]} (image i uses seed + i), "
             f"prompts sha256 {first.prompts_sha256[:12]}; s / image = generation + decode; speedup vs the teacher "
             f"row with the most steps."]
    seen: list[str] = []
    for r in rows:
        for ref in r.references:
            s = reference_summary(ref)
            if s not in seen:
                seen.append(s)
    notes += [f"- {s}" for s in seen]
    for name, desc in first.scorers.items():
        if name != "extractor":
            notes.append(f"- {name}: {json.dumps(desc, sort_keys=True)}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def markdown(rows: list[EvalRow], command: str, env: dict[str, Any]) -> str:
    """Header naming the command and environment, then one table per protocol."""
    when = time.strftime("%Y-%m-%d")
    parts = [f"Written by `{command}` ({when}; torch {env.get('torch')}, {env.get('device')}, "
             f"{env.get('torch_threads')} threads, {env.get('processes')} process(es), precision "
             f"{env.get('precision')}).\n"]
    for proto in dict.fromkeys(r.protocol for r in rows):
        group = [r for r in rows if r.protocol == proto]
        parts.append(f"**{proto}**: {group[0].protocol_label}\n\n{protocol_table(group)}")
    return "\n".join(parts)


def save_grids(rows: list[EvalRow], out: Path) -> None:
    """One PNG per row (10 per line) under out/grids/; sets `row.grid`."""
    from fewstep.train.report import save_grid

    for i, r in enumerate(rows):
        if r.grid_images is None or not len(r.grid_images):
            continue
        name = f"grids/{i:02d}-{slug(r.protocol)}-{slug(r.model)}-{r.steps}steps.png"
        save_grid(r.grid_images.float() / 255.0, out / name, nrow=min(10, len(r.grid_images)))
        r.grid = name


def plot_metric_vs_nfe(rows: list[EvalRow], path: Path) -> Path:
    """The main metric against NFE (log x), one line per model, one panel per protocol (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    protocols = list(dict.fromkeys(r.protocol for r in rows))
    fig = Figure(figsize=(5.5 * len(protocols), 4.2))
    FigureCanvasAgg(fig)
    for j, proto in enumerate(protocols):
        ax = fig.add_subplot(1, len(protocols), j + 1)
        group = [r for r in rows if r.protocol == proto]
        for model in dict.fromkeys(r.model for r in group):
            pts = sorted((r.nfe, r.metrics.get(r.main_metric, math.nan)) for r in group if r.model == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        key = group[0].main_metric
        ax.set_xscale("log")
        ax.set_xticks(sorted({r.nfe for r in group}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(f"{key} {_arrow(key)}")
        ax.set_title(f"{proto} (N = {group[0].n})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    return path


def environment(device: str, precision: str, processes: int) -> dict[str, Any]:
    """What the timings depend on: device, processes, library versions, threads, precision."""
    import platform

    import diffusers
    import torch

    return {"device": device, "processes": processes, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "precision": precision}


def check_out(out: Path) -> None:
    if (Path(out) / REPORT_JSON).exists():
        raise FewstepError(f"{out} already holds {REPORT_JSON}; pass a new --out or delete it first")


def write_report(rows: list[EvalRow], out: Path, command: str, env: dict[str, Any],
                 protocols: dict[str, Any]) -> Path:
    """report.json (claimed first, never overwritten), grids, metric_vs_nfe.png and report.md under `out`."""
    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    save_grids(rows, out)
    plot_metric_vs_nfe(rows, out / PLOT)
    doc = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": env, "protocols": protocols,
           "plot": PLOT, "rows": [r.to_json() for r in rows]}
    try:
        with open(out / REPORT_JSON, "x") as f:
            json.dump(doc, f, indent=2, allow_nan=False)
    except FileExistsError as exc:
        raise FewstepError(f"{out} already holds {REPORT_JSON}; pass a new --out or delete it first") from exc
    grids = "\n".join(f"- {r.label}: [{r.grid}]({r.grid})" for r in rows if r.grid)
    (out / REPORT_MD).write_text(f"# fewstep eval\n\n{markdown(rows, command, env)}\n![metric vs NFE]({PLOT})\n\n"
                                 f"Sample grids:\n\n{grids}\n")
    return out
