"""`fewstep bench` results: one `BenchRow` per (steps, batch) case, written as bench.json (raw timings) and a
markdown table."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fewstep.bench.measure import Case, Measurement
from fewstep.errors import FewstepError


RESULTS_JSON = "bench.json"

RESULTS_MD = "bench.md"
STUB_NOTE = (", NETWORK STUBBED (it returns its input: the times are the sampler loop, prompt encoding and VAE "
             "decode alone)")


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


def make_row(model: str, teacher_name: str, case: Case, m: dict[str, Measurement], sampler: str, guidance: float,
             resolution: int, env: dict[str, Any], stock_note: str | None) -> BenchRow:
    stock = m.get("stock")
    ratio = None if stock is None else stock.latency.median_s / m["engine"].latency.median_s
    return BenchRow(model=model, teacher=teacher_name, steps=case.steps, batch=case.batch, guidance=guidance,
                    resolution=resolution, sampler=sampler, times=case.times, engine=m["engine"], stock=stock,
                    stock_ratio=ratio, stock_setup=stock_note, env=env)


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


def load_note(env: dict[str, Any]) -> str:
    """'load average 0.42 on 2 cores, ' (empty where bench.json has no load average)."""
    load = env.get("load_average_1m")
    return "" if load is None else f"load average {load:.2f} on {env.get('cpu_count')} cores, "


def describe_env(rows: list[BenchRow]) -> str:
    """One line naming the hardware, versions, threads, dtype and protocol of a run."""
    if not rows:
        return ""
    e, r = rows[0].env, rows[0]
    dtype = e["net_dtype"] + (f" + {e['autocast_dtype']} autocast" if e["autocast_dtype"] else "")
    mem = "CUDA max allocated" if e["memory"] == "cuda_max_allocated" else "process RSS"
    return (f"{e['device_name']} ({e['device']}), torch {e['torch']}, diffusers {e['diffusers']}, "
            f"{e['torch_threads']} threads, {load_note(e)}{dtype}, attention {e['attention']}, "
            f"compile {e['compile'] or 'off'}"
            f"{STUB_NOTE if e.get('stub_network') else ''}; "
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
