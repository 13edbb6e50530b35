"""`fewstep bench`: timings that follow the work done, network calls counted exactly, results files that agree with
each other, the stock pipeline comparison, and the bad-input contract (one line, exit code 2, nothing overwritten)."""
import json
import math
from pathlib import Path

import pytest
import torch

from fewstep.bench import BenchRow, Stats, batch_tensor, counting, markdown_table, parse_int_list, run_bench
from fewstep.bench.report import describe_env
from fewstep.cli import main
from fewstep.errors import FewstepError

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]   # in the tiny tokenizer's vocabulary
QUIET = dict(progress=False, prompts=PROMPTS, device="cpu")   # the CPU path; GPU runs are in test_cuda.py


def test_more_steps_take_longer_and_cfg_doubles_the_rows(teacher_dir: Path):
    rows = run_bench(str(teacher_dir), [1, 8], [1], guidance=2.0, repeats=5, **QUIET)
    one, eight = rows
    assert (one.steps, eight.steps) == (1, 8) and one.batch == eight.batch == 1
    assert eight.engine.latency.median_s > one.engine.latency.median_s   # 8x the network work
    for r in rows:   # batched CFG: one call per step on a doubled batch
        assert r.engine.forward_calls == r.steps and r.engine.forward_rows == 2 * r.steps
        assert r.nfe == 2 * r.steps and len(r.engine.latency.runs_s) == 5
        assert r.stock is None and r.stock_ratio is None and r.guidance == 2.0
        m = r.engine.memory
        assert m.kind == "cpu_rss" and m.peak_mb > 0 and m.increase_mb >= 0 and m.peak_mb >= m.baseline_mb
    off = run_bench(str(teacher_dir), [3], [2], guidance=1.0, repeats=1, **QUIET)[0]
    assert (off.engine.forward_calls, off.engine.forward_rows, off.nfe) == (3, 6, 3.0)   # no CFG: B rows per step
    env = off.env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["net_dtype"] == "float32"
    assert env["torch_threads"] >= 1 and env["warmup"] == 1 and env["repeats"] == 1 and env["memory_after_load_mb"] > 0


def test_cli_writes_coherent_json_and_markdown_with_stock_ratio(teacher_dir: Path, tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "bench"
    main(["bench", str(teacher_dir), "--device", "cpu", "--steps", "1,2", "--batch-sizes", "1,2", "--guidance", "2",
          "--repeats", "2", "--compare-stock", "--prompts", str(prompts), "--out", str(out), "--no-progress",
          "--results", str(tmp_path / "results.md"), "--section", "bench-tiny"])
    printed = capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    assert data["env"]["device"] == "cpu" and "diffusers" in data["env"]
    rows = data["rows"]
    assert [(r["steps"], r["batch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:
        e, s = r["engine"], r["stock"]
        lat = e["latency"]
        assert len(lat["runs_s"]) == 2 and lat["min_s"] <= lat["median_s"] <= lat["max_s"]
        assert e["images_per_s"] == pytest.approx(r["batch"] / lat["median_s"], rel=1e-9)
        assert e["ms_per_image"] == pytest.approx(1000 * lat["median_s"] / r["batch"], rel=1e-9)
        assert e["nfe"] == 2 * r["steps"] and s["nfe"] == e["nfe"] and r["same_work"]   # same work on both sides
        assert s["forward_calls"] == e["forward_calls"] == r["steps"]
        assert math.isfinite(r["stock_ratio"]) and r["stock_ratio"] > 0
        assert r["stock_ratio"] == pytest.approx(s["latency"]["median_s"] / lat["median_s"], rel=1e-9)
        assert "DDIMScheduler" in r["stock_setup"]
    md = (out / "bench.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| tiny-sd")]
    assert len(table) == 4 and all(line in printed for line in table)
    section = (tmp_path / "results.md").read_text()
    assert "<!-- BEGIN bench-tiny -->" in section and "Written by `fewstep bench " in section
    assert "fewstep bench bench" not in section
    assert all(line in section for line in table)
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == [str(r["steps"]), str(r["batch"]), str(2 * r["steps"])]
        assert float(cells[6]) == pytest.approx(r["engine"]["images_per_s"], abs=0.006)
        assert float(cells[8]) == pytest.approx(r["stock_ratio"], abs=0.006)

    before = (out / "bench.json").read_text()
    with pytest.raises(SystemExit) as info:
        main(["bench", str(teacher_dir), "--steps", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "already exists and is not empty" in err[0]
    assert (out / "bench.json").read_text() == before


def test_export_compares_against_its_recorded_scheduler(teacher_dir: Path, tmp_path: Path):
    from fewstep.export import export_student
    from fewstep.models.student import add_lora
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes.base import InferenceSpec

    teacher = load_teacher(str(teacher_dir))
    net = add_lora(teacher.net, 2, 2.0, teacher.family.lora_targets, init_scale=0.05)
    spec = InferenceSpec(times=[float(t) for t in teacher.student_times(2)], step="consistency")
    export = export_student(teacher, net, spec, tmp_path / "export", recipe="lcm", teacher_name=str(teacher_dir))
    rows = run_bench(str(export), [2, 3], [2], compare_stock=True, repeats=1, **QUIET)
    for r in rows:
        assert r.sampler == "consistency" and r.guidance == 1.0 and "LCMScheduler" in r.stock_setup
        assert r.nfe == r.steps and r.stock.forward_rows == r.engine.forward_rows == 2 * r.steps and r.same_work
        assert r.stock_ratio > 0 and math.isfinite(r.stock_ratio)
    assert rows[0].times == spec.times   # the export's own grid at its step count
    assert rows[0].model == f"{tmp_path.name}/export"   # an export is named with its run folder
    assert "†" not in markdown_table(rows)
    rows[0].stock.forward_rows += 1
    assert "†" in markdown_table(rows)   # unequal work is flagged, not hidden


def test_toy_preset_with_stock_comparison():
    row = run_bench("toy-digits", [1], [2], guidance=2.0, compare_stock=True, repeats=1, progress=False)[0]
    assert isinstance(row, BenchRow) and row.teacher == "toy-digits" and row.resolution == 16
    assert row.engine.forward_rows == row.stock.forward_rows == 4 and row.nfe == 2
    assert row.stock_ratio > 0 and math.isfinite(row.stock_ratio)


def test_stub_network_times_the_loop_alone_and_restores_the_network():
    """--stub-network: the same calls on both sides, far less time than the real network at 50 steps, and the
    network computes again afterwards (the stub is removed)."""
    from fewstep.bench.sides import patched_forward, stub_network

    real, stub = (run_bench("toy-digits", [50], [4], guidance=2.0, compare_stock=True, repeats=1, progress=False,
                            stub_network=on)[0] for on in (False, True))
    for side in ("engine", "stock"):
        a, b = getattr(real, side), getattr(stub, side)
        assert (a.forward_calls, a.forward_rows) == (b.forward_calls, b.forward_rows) == (50, 400)
        assert b.latency.median_s < 0.5 * a.latency.median_s
    assert stub.env["stub_network"] and not real.env["stub_network"]
    assert "NETWORK STUBBED" in describe_env([stub]) and "STUBBED" not in describe_env([real])
    net = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with stub_network(net, True):
        assert net(x).sample is x and net(x, return_dict=False)[0] is x
    assert "forward" not in vars(net) and torch.allclose(net(x), torch.nn.functional.linear(x, net.weight, net.bias))
    outer = lambda *a, **k: "outer"                          # noqa: E731  (an enclosing patch, e.g. net_autocast)
    with patched_forward(net, outer):
        with stub_network(net, True):
            assert net(x).sample is x
        assert net(x) == "outer"                             # the enclosing patch is back
    assert "forward" not in vars(net)
    with pytest.raises(FewstepError, match="--stub-network"):
        run_bench("toy-digits", [1], [1], stub_network=True, compile=True, progress=False, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
@pytest.mark.parametrize("flags", [["--compile"], ["--cuda-graphs"], ["--precision", "bf16"],
                                   ["--attention", "flash"], ["--attention", "xformers"]])
def test_cuda_only_flags_on_cpu_are_one_line_exit_2(flags: list[str], tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "toy-digits", "--steps", "1", "--out", str(tmp_path / "b"), "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {flags[0]}") and "needs a CUDA device" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps '0'"),
                                           (["--batch-sizes", "a,b"], "--batch-sizes"),
                                           (["--repeats", "0"], "--repeats: must be >= 1")])
def test_bad_lists_and_counts_are_one_line_exit_2(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "toy-digits", "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and message in err[0]


def test_stats_counter_and_list_parsing():
    s = Stats.of([0.3, 0.1, 0.2, 0.4])
    assert (s.median_s, s.min_s, s.max_s) == pytest.approx((0.25, 0.1, 0.4))
    assert s.iqr_s == pytest.approx(0.15) and s.std_s > 0 and Stats.of([0.5]).iqr_s == Stats.of([0.5]).std_s == 0.0
    assert parse_int_list("1, 4,50", "--steps") == [1, 4, 50]
    with pytest.raises(FewstepError):
        parse_int_list("1,-2", "--steps")

    class KwargsNet(torch.nn.Module):   # transformers take hidden_states by keyword
        def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return hidden_states

    net = KwargsNet()
    with counting(net) as counter:
        net(hidden_states=torch.zeros(6, 3), timestep=torch.zeros(1))
        net(torch.zeros(4, 3), torch.zeros(4))
    net(torch.zeros(5, 3), torch.zeros(5))   # after the block: not counted
    assert (counter.calls, counter.rows) == (2, 10)
    assert batch_tensor((), {"timestep": torch.zeros(2)}) is not None


def test_weights_dtype_casts_every_component_and_is_recorded(teacher_dir: Path):
    """--dtype bfloat16 runs both sides on bf16 weights (as `torch_dtype=torch.bfloat16` would load them)."""
    row = run_bench(str(teacher_dir), [2], [1], guidance=2.0, repeats=1, compare_stock=True, dtype="bfloat16",
                    **QUIET)[0]
    assert row.env["net_dtype"] == "bfloat16" and row.env["weights_dtype"] == "bfloat16"
    assert row.same_work and row.engine.nfe == row.stock.nfe == 4
    with pytest.raises(FewstepError, match="--dtype 'half' is not one of"):
        run_bench(str(teacher_dir), [1], [1], repeats=1, dtype="half", **QUIET)


def test_environment_records_load_average_and_threads(teacher_dir: Path):
    row = run_bench(str(teacher_dir), [1], [1], repeats=1, **QUIET)[0]
    env = row.env
    assert env["load_average_1m"] is not None and env["load_average_1m"] >= 0
    assert env["torch_threads"] == torch.get_num_threads() and env["threads_requested"] is None
    assert f"load average {env['load_average_1m']:.2f} on {env['cpu_count']} cores" in describe_env([row])


@pytest.mark.parametrize("load, warned", [(99.0, True), (0.0, False)])
def test_busy_machine_warns_once_before_timing(load: float, warned: bool, teacher_dir: Path, monkeypatch, capsys):
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    env = run_bench(str(teacher_dir), [1], [1], repeats=1, **QUIET)[0].env
    err = [line for line in capsys.readouterr().err.splitlines() if "load average" in line]
    assert env["load_average_1m"] == load
    if warned:
        assert err == ["warning: load average 99.0 on 2 cores: another job is running, timings will be noisy; "
                       "run benchmarks alone"]
    else:
        assert err == []


def test_threads_option_is_applied_recorded_and_restored(teacher_dir: Path, tmp_path: Path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "bench"
    torch.set_num_threads(2)   # conftest runs tests on one thread; start elsewhere so --threads 1 shows
    try:
        main(["bench", str(teacher_dir), "--device", "cpu", "--steps", "1", "--repeats", "1", "--threads", "1",
              "--prompts", str(_prompts_file(tmp_path)), "--out", str(out), "--no-progress"])
        assert torch.get_num_threads() == 2   # put back after the run
    finally:
        torch.set_num_threads(before)
    env = json.loads((out / "bench.json").read_text())["env"]
    assert env["threads_requested"] == 1 and env["torch_threads"] == 1 and "load_average_1m" in env
    assert "diffusers " + env["diffusers"] + ", 1 threads, load average" in (out / "bench.md").read_text()
    with pytest.raises(SystemExit) as info:
        main(["bench", str(teacher_dir), "--threads", "0", "--no-progress"])
    assert info.value.code == 2 and "--threads" in capsys.readouterr().err


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path
