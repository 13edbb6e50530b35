"""GPU paths: CUDA vs CPU agreement, bf16 autocast and weights, every attention backend, torch.compile and CUDA
graphs, CUDA memory accounting, training with accelerate's bf16 mixed precision.

Skipped without CUDA (CI has none); `scripts/gpu_check.sh` runs them on a GPU machine with the GPU benchmarks.
Tolerances: CUDA float32 convolutions use TF32 by default (relative error ~1e-3); bf16 carries ~8 bits of
mantissa, and 4 guided bf16 steps of the toy land 5-6% (relative L2 of the latents) from float32, as measured
on an H100.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 0", "a handwritten digit 5"]
SEEDS = [0, 1, 2, 3]


def toy(device: str) -> Any:
    from fewstep.models.teacher import load_teacher

    return load_teacher("toy-digits", device=device)


def latents(teacher: Any, autocast: torch.dtype | None = None, ctx: Any = None, steps: int = 4) -> torch.Tensor:
    from fewstep.sampling.generate import generate_latents

    teacher.autocast_dtype = autocast
    with ctx or nullcontext():
        out = generate_latents(teacher, teacher.denoiser(), teacher.net, PROMPTS, SEEDS,
                               teacher.teacher_times(steps), "ddim", 2.0)
    return out.float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """The same 4 guided steps in float32 on the CPU."""
    return latents(toy("cpu"))


def test_cuda_float32_matches_cpu(reference: torch.Tensor):
    out = latents(toy("cuda"))
    assert torch.isfinite(out).all() and rel(out, reference) < 1e-2


def test_bf16_autocast_and_bf16_weights_stay_close_to_float32(reference: torch.Tensor):
    teacher = toy("cuda")
    auto = latents(teacher, torch.bfloat16)
    assert torch.isfinite(auto).all() and 1e-5 < rel(auto, reference) < 1e-1   # bf16 really ran (0.058 measured)
    teacher.pipe.to(dtype=torch.bfloat16)
    weights = latents(teacher)
    assert next(teacher.net.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(weights).all() and 1e-5 < rel(weights, reference) < 1e-1


@pytest.mark.parametrize("backend", ["math", "efficient", "flash", "xformers"])
def test_attention_backends_agree_with_default_sdpa(backend: str):
    """math and efficient run in float32 and must match the default closely; flash and xformers take half
    precision only, so they are compared with the default kernel in bf16 (bf16 kernels differ by ~5% after 4
    guided steps on this model: measured 0.054 between math and the default)."""
    from fewstep.errors import FewstepError
    from fewstep.models.attention import set_attention_backend

    teacher = toy("cuda")
    half = backend in ("flash", "xformers")
    autocast = torch.bfloat16 if half else None
    base = latents(teacher, autocast)
    before = dict(teacher.net.attn_processors)
    try:
        out = latents(teacher, autocast, set_attention_backend(teacher.net, backend))
    except FewstepError as exc:   # an xformers wheel built for another torch: the clear error is the product
        assert backend == "xformers" and "xformers" in str(exc)
        pytest.skip(str(exc))
    assert torch.isfinite(out).all() and rel(out, base) < (1e-1 if half else 5e-3)
    assert all(teacher.net.attn_processors[k] is p for k, p in before.items())   # restored after the block


def test_flash_attention_refuses_float32():
    """Flash kernels take half precision only: pinned to flash, a float32 network fails instead of silently running
    another kernel, and the bench refuses the combination before loading anything."""
    from fewstep.bench import run_bench
    from fewstep.errors import FewstepError
    from fewstep.models.attention import set_attention_backend

    teacher = toy("cuda")
    with pytest.raises(RuntimeError):
        latents(teacher, None, set_attention_backend(teacher.net, "flash"))
    with pytest.raises(FewstepError, match="flash attention runs in bf16/fp16 only"):
        run_bench("toy-digits", [1], [1], precision="fp32", attention="flash", progress=False)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_network_matches_eager(mode: str):
    teacher = toy("cuda")
    eager = latents(teacher)
    teacher.net.compile(mode=mode)
    for _ in range(3):   # reduce-overhead records its graphs on the first calls
        out = latents(teacher)
    assert torch.isfinite(out).all() and rel(out, eager) < 5e-3   # float32: only kernel choice differs


def test_bench_on_cuda_counts_memory_and_compiled_variants_do_the_same_work():
    from fewstep.bench import run_bench

    quiet = dict(progress=False, prompts=PROMPTS, guidance=2.0)
    eager = run_bench("toy-digits", [1, 4], [2], repeats=2, compare_stock=True, **quiet)
    for row in eager:
        assert row.env["device"] == "cuda" and row.env["autocast_dtype"] == "bfloat16"
        m = row.engine.memory
        assert m.kind == "cuda_max_allocated" and m.peak_mb > m.baseline_mb > 0
        assert row.same_work and row.stock_ratio is not None and row.stock_ratio > 0
    for flags in ({"compile": True}, {"cuda_graphs": True}):
        rows = run_bench("toy-digits", [1, 4], [2], repeats=2, **flags, **quiet)
        assert [r.engine.forward_calls for r in rows] == [r.engine.forward_calls for r in eager]
        assert [r.nfe for r in rows] == [r.nfe for r in eager]
        assert all(r.engine.latency.median_s > 0 for r in rows)


def test_distill_with_bf16_mixed_precision_on_cuda(tmp_path: Path):
    """A few DMD2 steps on the GPU under accelerate's bf16 autocast: finite losses, a checkpoint, an export that
    samples on CUDA."""
    from fewstep.distill import run
    from fewstep.sample import resolve_model

    out = tmp_path / "dmd2"
    run(["recipe=dmd2", f"output_dir={out}", "train.steps=4", "train.mixed_precision=bf16", "data.batch_size=8",
         "train.log_every=1", "train.progress=false", "sample.grid_size=4", "attention=efficient"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(v)).all() for r in rows for k, v in r.items()
                                  if k.startswith("loss"))
    teacher, spec, _ = resolve_model(str(out / "export"), None, None, "cuda")
    assert next(teacher.net.parameters()).device.type == "cuda"
    out_latents = latents(teacher, torch.bfloat16, steps=len(spec.times) - 1)
    assert torch.isfinite(out_latents).all()


def test_fp16_trains_with_accelerates_gradient_scaler(tmp_path: Path):
    """train.mixed_precision=fp16 on CUDA: accelerate's GradScaler scales the loss (the prepared optimizers step
    through it) and the losses stay finite; two roles (DMD2 student and critic) share the one scaler."""
    from fewstep.config import load_config
    from fewstep.distill import build_run, make_accelerator
    from fewstep.train.trainer import Trainer

    cfg = load_config(["recipe=dmd2", f"output_dir={tmp_path / 'fp16'}", "train.steps=4", "data.batch_size=8",
                       "train.mixed_precision=fp16", "method.critic_steps_per_student_step=2"])
    acc = make_accelerator(cfg)
    assert acc.scaler is not None
    teacher, recipe, dataset = build_run(cfg, acc.device)
    trainer = Trainer(cfg, recipe, teacher, dataset, acc)
    rows = []
    for _ in range(4):
        rows.append(trainer.train_iteration())
        trainer.step += 1
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/"))
    assert {k for r in rows for k in r} >= {"loss/student", "loss/critic", "skipped/student", "skipped/critic"}


def test_fsdp2_training_step_on_one_gpu_matches_the_unsharded_step(tmp_path: Path):
    """accelerate's FSDP2 on CUDA (world size 1 here; tests/test_world_size.py runs 2 CPU processes): the
    training step of tests/fsdp2_cpu_train.py sharded and unsharded give the same losses and weights within the
    tolerance of TF32 matmuls."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    argv = ["recipe=lcm", "train.steps=3", "student.mode=lora", "student.lora.rank=2", "student.lora.alpha=2",
            "data.batch_size=4", "train.progress=false", f"output_dir={tmp_path / 'run'}"]
    outs = {}
    for engine in ("single", "fsdp2"):
        outs[engine] = tmp_path / engine
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(root / "tests" / "fsdp2_cpu_train.py"), str(outs[engine]), "--engine",
               engine, *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    rows = {e: json.loads((o / "rows.json").read_text()) for e, o in outs.items()}
    for a, b in zip(rows["single"], rows["fsdp2"]):
        assert b["loss/student"] == pytest.approx(a["loss/student"], rel=1e-2)
    wa, wb = (load_file(o / "weights.safetensors") for o in outs.values())
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-3)


def test_distill_under_the_fsdp2_launch_config_saves_shards_resumes_and_exports(tmp_path: Path):
    """`accelerate launch --config_file recipes/accelerate/fsdp2.yaml scripts/distill.py` on every GPU here (bf16,
    full shard): each process writes its shard of the checkpoint, `resume=latest` continues from it, and the export
    loads into the stock pipeline."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    gpus = torch.cuda.device_count()
    out = tmp_path / "run"
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(root / "recipes" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(gpus), "--num_machines", "1",
            str(root / "scripts" / "distill.py"), "recipe=lcm", "student.mode=lora", "student.lora.rank=2",
            "student.lora.alpha=2", "data.batch_size=2", "train.progress=false", "train.checkpoint_every=2",
            "train.sample_every=2", f"output_dir={out}"]
    done = subprocess.run([*base, "train.steps=2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = list((out / "checkpoints" / "step-0000002" / "shards").glob("*.safetensors"))
    assert len(shards) == gpus
    done = subprocess.run([*base, "train.steps=4", "resume=latest"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
    from fewstep.export import load_export

    teacher, spec, meta = load_export(out / "export")
    assert meta["train_steps"] == 4


@pytest.mark.parametrize("config", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_distill_under_the_deepspeed_launch_configs_trains_and_resumes(config: str, tmp_path: Path):
    """`accelerate launch --config_file recipes/accelerate/deepspeed-zero{2,3}.yaml scripts/distill.py` on every
    GPU here (bf16; ZeRO-3 with the optimizer offloaded to the CPU): it trains, its checkpoint (one file of fp32
    weight and optimizer-state partitions per process; under ZeRO-3 read and written through DeepSpeed's local-state
    API, which copies from and to the offload device) resumes under the same config and on one process without
    DeepSpeed, the export loads. tests/test_zero.py checks the same paths' numbers on 2 CPU processes."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from fewstep.export import load_export

    root = Path(__file__).resolve().parent.parent
    gpus = torch.cuda.device_count()
    out = tmp_path / "run"
    args = [str(root / "scripts" / "distill.py"), "recipe=lcm", "student.mode=lora", "student.lora.rank=2",
            "student.lora.alpha=2", "data.batch_size=2", "train.progress=false", "train.checkpoint_every=2",
            "train.sample_every=2", f"output_dir={out}"]

    def launch(config: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "recipes" / "accelerate" / config), "--num_processes", str(gpus), "--num_machines", "1",
               *args, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    done = launch(config, "train.steps=2")
    assert done.returncode == 0 and "(DEEPSPEED" in done.stdout + done.stderr, done.stderr[-3000:]
    assert len(list((out / "checkpoints" / "step-0000002" / "shards").glob("*.safetensors"))) == gpus
    done = launch(config, "train.steps=4", "resume=latest")
    assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
    assert load_export(out / "export")[2]["train_steps"] == 4
    done = subprocess.run([sys.executable, *args, "train.steps=6", "resume=latest"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stderr[-3000:]
    assert load_export(out / "export")[2]["train_steps"] == 6


def test_offloaded_text_encoder_and_vae_free_gpu_memory_and_give_the_same_results(tmp_path: Path):
    """train.offload_frozen on a GPU: the toy's text encoder and VAE sit in CPU memory (the allocator holds less by
    at least their size), encodings and decodes come back on the GPU equal to the resident ones, and a DMD2 run
    with the switch trains."""
    from fewstep.distill import run

    teacher = toy("cuda")
    lat = torch.randn(2, *teacher.latent_shape(), device="cuda")
    resident = teacher.encode_prompts(["a photo of the digit 3"])["encoder_hidden_states"], teacher.decode(lat)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    teacher.offload_frozen()
    freed = before - torch.cuda.memory_allocated()
    size = sum(p.numel() * p.element_size() for name in ("text_encoder", "vae")
               for p in getattr(teacher.pipe, name).parameters())
    assert freed >= size > 0
    cond = teacher.encode_prompts(["a photo of the digit 3"])["encoder_hidden_states"]
    assert cond.device.type == "cuda" and next(teacher.pipe.text_encoder.parameters()).device.type == "cpu"
    torch.testing.assert_close(cond, resident[0])
    torch.testing.assert_close(teacher.decode(lat), resident[1], rtol=1e-4, atol=1e-4)
    assert next(teacher.pipe.vae.parameters()).device.type == "cpu"
    out = tmp_path / "dmd2"
    run(["recipe=dmd2", f"output_dir={out}", "train.steps=2", "data.batch_size=8", "train.log_every=1",
         "train.progress=false", "sample.grid_size=2", "train.offload_frozen=true"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / "export").is_dir()
