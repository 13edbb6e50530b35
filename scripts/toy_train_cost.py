"""Training cost on the toy teacher: seconds per iteration and peak memory for each recipe x student mode x critic
mode x engine (one process, or DDP on 2 processes with half the batch each), plus the memory switches
(gradient checkpointing, the text-embedding cache), written into docs/results.md (section `train-cost`).

    python scripts/toy_train_cost.py                # about 5 minutes on 2 CPU cores; run it alone

(scripts/train_cost.py summarises runs you trained yourself, e.g. on a GPU.)

Each row is a short `fewstep distill` run of its preset (`recipe=<r> model=toy-digits`, the global batch of the
preset); s/iter is the mean over the iterations after the warm-up (DMD2-style recipes alternate critic-only and
student iterations, so the mean includes both in their ratio); peak memory is the main process's resident set
(the CUDA allocator's high-water mark on a GPU: `cuda_peak_gb` in metrics.jsonl). FSDP2 rows run accelerate's
FSDP2 forced onto CPU processes by tests/fsdp2_cpu_train.py (accelerate builds FSDP2 only on GPUs). The toy's
networks are a few MB, so the peak memory is mostly the process itself and a sharding saving cannot show; the FSDP2
rows measure the cost of the per-block gathers over gloo, not what FSDP2 saves on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewstep.config import load_config  # noqa: E402
from fewstep.metrics.toy_report import write_section  # noqa: E402

ROWS = [  # recipe, student mode, critic mode, switches (extra overrides), also on FSDP2
    ("lcm", "lora", "-", [], True),
    ("lcm", "full", "-", [], True),   # with its EMA target network, sharded like the student
    ("dmd2", "full", "full", [], True),   # with the GAN head (the critic role trains two networks)
    ("dmd2", "lora", "lora", [], True),
    ("dmd2", "lora", "lora", ["student.gradient_checkpointing=true"], False),
    ("dmd2", "lora", "lora", ["train.text_embedding_cache=false"], False),
    ("dmd2", "lora", "full", [], False),
    ("tdm", "full", "full", [], False),
    ("tdm", "lora", "lora", [], False),
    ("phased_dmd", "full", "full", [], False),
]
ENGINES = ("single", "ddp")
LABELS = {"single": "1 process, 2 threads", "ddp": "DDP, 2 processes x 1 thread",
          "fsdp2": "FSDP2, 2 processes x 1 thread"}


def overrides(recipe: str, student: str, critic: str, extra: list[str]) -> list[str]:
    argv = [f"recipe={recipe}", "model=toy-digits", f"student.mode={student}", *extra]
    return argv + ([f"method.critic_mode={critic}"] if critic != "-" else [])


def measure(argv: list[str], engine: str, steps: int, warmup: int, out: Path) -> dict[str, float]:
    batch = int(load_config(argv).data.batch_size)
    common = [*argv, f"output_dir={out}", f"train.steps={steps}", "train.log_every=1", "train.sample_every=0",
              "train.checkpoint_every=0", "train.progress=false", "sample.grid_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if engine == "single":
        cmd = [sys.executable, str(ROOT / "scripts" / "distill.py"), *common, f"data.batch_size={batch}"]
        env["OMP_NUM_THREADS"] = "2"
    else:   # 2 CPU processes (gloo), one thread each, half the batch each: the same global batch
        # FSDP2: accelerate's FSDP2 path, which it builds only on GPUs, forced on CPU processes by the test harness
        script = ["tests/fsdp2_cpu_train.py", "unused", "--engine", "fsdp2-run"] if engine == "fsdp2" else \
            ["scripts/distill.py"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(ROOT / script[0]), *script[1:], *common, f"data.batch_size={batch // 2}"]
        env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} ({engine}) failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["sec_per_step"] for r in rows[warmup:]]
    peak = rows[-1].get("peak_rss_mb", rows[-1].get("cuda_peak_gb", float("nan")) * 1024)
    return {"batch": batch, "sec": statistics.mean(timed), "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="iterations left out of the mean")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--section", default="train-cost")
    args = ap.parse_args()
    import torch

    lines = ["| recipe | student | critic | switches | engine | global batch | s / iteration | peak RSS MB (main "
             "process) |", "|---|---|---|---|---|---:|---:|---:|"]
    tic = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n, (recipe, student, critic, extra, fsdp2) in enumerate(ROWS):
            for engine in (*ENGINES, "fsdp2") if fsdp2 else ENGINES:
                argv = overrides(recipe, student, critic, extra)
                m = measure(argv, engine, args.steps, args.warmup, Path(tmp) / f"{n}-{engine}")
                switch = ", ".join(extra) or "-"
                label = LABELS[engine]
                lines.append(f"| {recipe} | {student} | {critic} | {switch} | {label} | {m['batch']} | "
                             f"{m['sec']:.3f} | {m['peak_mb']:.0f} |")
                print(lines[-1], flush=True)
    head = (f"Written by `python scripts/toy_train_cost.py --steps {args.steps} --warmup {args.warmup}` "
            f"({time.strftime('%Y-%m-%d')}; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU "
            f"cores, nothing else running; {time.time() - tic:.0f} s). Toy teacher presets, mean seconds per "
            f"iteration over iterations {args.warmup + 1}-{args.steps}; peak resident memory of the main process.")
    write_section(args.results, args.section, head + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
