"""How far 2 CPU processes with half batches land from 1 process: the largest relative difference of the logged
losses and the largest absolute difference of the trained weights, for every case of tests/test_world_size.py's
RECIPES (DDP) and FSDP2 tables, slow ones included, with its settings (train.adam_eps=1e-4). Prints a markdown table.

    python scripts/world_size_diffs.py          # about 4 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_world_size as W  # noqa: E402
from tiny_pipelines import tiny_sd  # noqa: E402


def diffs(rows_a: list[dict], rows_b: list[dict], wa: dict, wb: dict) -> tuple[float, float]:
    loss = max(abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for a, b in zip(rows_a, rows_b) for k in a
               if k.startswith("loss/"))
    return loss, max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    print("| engine | recipe | losses: max relative diff | weights: max abs diff |\n|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_sd().save_pretrained(str(root / "teacher"), safe_serialization=True)
        teacher = root / "teacher"
        for recipe in sorted(W.RECIPES):
            one, two = root / f"ddp-{recipe}-one", root / f"ddp-{recipe}-two"
            W.run(teacher, one, recipe, processes=1, batch=4)
            W.run(teacher, two, recipe, processes=2, batch=2)
            rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
            loss, weight = diffs(*rows, W.final_weights(one), W.final_weights(two))
            print(f"| DDP | {recipe} | {loss:.1e} | {weight:.1e} |", flush=True)
        for recipe in sorted(W.FSDP2):
            rows_one, w_one = W.fsdp2_run(teacher, root / f"fsdp-{recipe}-one", recipe, "single")
            rows_two, w_two = W.fsdp2_run(teacher, root / f"fsdp-{recipe}-two", recipe, "fsdp2")
            loss, weight = diffs(rows_one, rows_two, w_one, w_two)
            print(f"| FSDP2 | {recipe} | {loss:.1e} | {weight:.1e} |", flush=True)


if __name__ == "__main__":
    main()
