"""The scripts behind the GPU results (scripts/gpu_check.sh): shape-only pipelines, the bench variant table and the
training-cost table. They run here on the CPU with tiny models; on a GPU the same code writes docs/results.md."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_variants  # noqa: E402
import random_pipeline  # noqa: E402
import train_cost  # noqa: E402


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family, unet, text", [("sd15", 859_520_964, [123_060_480]),
                                                ("sdxl", 2_567_463_684, [123_060_480, 694_659_840])])
def test_shape_only_pipelines_have_the_published_parameter_counts(family: str, unet: int, text: list[int]):
    """Built on the meta device (no memory): the UNet, VAE and text encoders have exactly the parameter counts of
    the released SD1.5 / SDXL checkpoints, so their cost is the real models' cost."""
    with torch.device("meta"):
        pipe = random_pipeline.build(family)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    assert n_params(pipe.unet) == unet and n_params(pipe.vae) == 83_653_863
    assert [n_params(e) for e in encoders] == text
    assert len(pipe.tokenizer("a handwritten digit 3", padding="max_length").input_ids) == 77


def test_bench_variants_tables_each_variant_and_reports_failures(teacher_dir: Path, tmp_path: Path, capsys):
    out, results = tmp_path / "variants", tmp_path / "results.md"
    argv = [str(teacher_dir), "--steps", "1,2", "--batch-sizes", "1", "--repeats", "2", "--warmup", "1",
            "--device", "cpu", "--guidance", "2", "--out", str(out), "--results", str(results), "--section", "v",
            "--variant", "default=compare_stock=true", "--variant", "math kernel=attention=math",
            "--variant", "flash on cpu=attention=flash"]
    assert bench_variants.main(argv) == 0
    for name in ("default", "math-kernel"):
        data = json.loads((out / name / "bench.json").read_text())
        assert [(r["steps"], r["batch"]) for r in data["rows"]] == [(1, 1), (2, 1)]
    assert not (out / "flash-on-cpu").exists()
    text = results.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| default") or line.startswith("| math kernel")]
    assert len(rows) == 4 and all(r.count("|") == 11 for r in rows)
    assert rows[0].split("|")[9].strip() == "1.00×"   # the first variant is the speedup reference
    assert rows[0].split("|")[10].strip() != "–" and rows[2].split("|")[10].strip() == "–"   # stock only if asked
    assert "| flash on cpu | – | – | – | failed: --attention flash needs a CUDA device" in text
    assert "python scripts/bench_variants.py" in text and '**math kernel**: {"attention": "math"}' in text
    assert bench_variants.main(argv) == 2   # never writes into a non-empty --out
    with pytest.raises(SystemExit, match="unknown setting 'speed'"):
        bench_variants.parse_variant("x=speed=11")


def test_train_cost_summarises_runs_and_refuses_other_folders(tmp_path: Path, capsys):
    from omegaconf import OmegaConf

    from fewstep.config import load_config

    run = tmp_path / "dmd2-run"
    run.mkdir()
    OmegaConf.save(load_config(["recipe=dmd2", "data.batch_size=8"]), run / "config.yaml")
    rows = [{"step": 5, "sec_per_step": 9.0, "cuda_peak_gb": 30.0, "loss/student": 1.0},   # warm-up window
            {"step": 10, "sec_per_step": 0.5, "cuda_peak_gb": 31.5, "loss/student": 0.5},
            {"step": 15, "sec_per_step": 0.7, "cuda_peak_gb": 31.8, "loss/student": 0.25, "loss/critic": 2.0},
            {"step": 20, "sec_per_step": 0.6, "cuda_peak_gb": 31.8, "loss/student": 0.125}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = train_cost.summarise(run)
    assert s["sec_per_step"] == pytest.approx(0.6) and s["images_per_s"] == pytest.approx(8 / 0.6)
    assert s["cuda_peak_gb"] == 31.8 and s["steps"] == 20 and s["batch"] == 8 and s["recipe"] == "dmd2"
    assert s["last_losses"] == {"loss/student": 0.125}
    results = tmp_path / "r.md"
    assert train_cost.main([str(run), "--results", str(results), "--section", "cost"]) == 0
    assert "| dmd2-run | dmd2 |" in results.read_text() and "| 0.600 | 13.3 | 31.8 |" in results.read_text()
    assert train_cost.main([str(tmp_path)]) == 2
    assert "not a fewstep run folder" in capsys.readouterr().err
