"""`fewstep eval`: protocol presets, the end-to-end CLI on the embedded toy teacher (report files that agree with each
other and with the metric code), teacher-FID with a stored, reused and guarded reference, clear refusals of
missing files and bad input, the trainer hook, and the index sharding of multi-process runs."""
import json
import math

import pytest
import torch

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.eval.protocols import list_protocols, load_protocol
from fewstep.eval.run import evaluate_during_training, shard_indices

N = 40
COCO_ENV = ("FEWSTEP_COCO2014_CAPTIONS", "FEWSTEP_COCO2014_IMAGES", "FEWSTEP_COCO2017_CAPTIONS",
            "FEWSTEP_COCO2017_IMAGES", "FEWSTEP_INCEPTION_WEIGHTS", "FEWSTEP_CLIP_VITG14")


@pytest.fixture
def stats_dir(tmp_path, monkeypatch):
    path = tmp_path / "stats"
    monkeypatch.setenv("FEWSTEP_STATS_DIR", str(path))
    for var in COCO_ENV:
        monkeypatch.delenv(var, raising=False)
    return path


def fails(argv, capsys) -> str:
    """Run the CLI, expect exit code 2 and one error line (the last), return it."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()   # model loading may print progress bars first
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_shards_are_disjoint_and_complete(n, world):
    shards = [shard_indices(n, rank, world) for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert all(max(s, default=0) - min(s, default=0) <= n for s in shards)
    with pytest.raises(ValueError):
        shard_indices(n, world, world)


def test_toy_eval_end_to_end(stats_dir, tmp_path, capsys):
    out, results = tmp_path / "eval", tmp_path / "results.md"
    argv = ["eval", "toy-digits", "--protocol", "toy-digits", "--steps", "1,2", "--num-images", str(N), "--guidance",
            "2", "--out", str(out), "--no-progress", "--results", str(results), "--section", "toy-eval",
            "--device", "cpu"]   # the in-memory reference below runs float32 on the CPU
    main(argv)
    printed = capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    rows = doc["rows"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 2), (2, 4)]   # batched CFG: 2 evaluations per step
    for r in rows:
        m = r["metrics"]
        assert set(m) == {"fid[digits-cnn]", "fid[digits-mlp]", "clip_score[micro-clip-digits]",
                          "reward[digits-class]", "class_accuracy", "diversity"}
        assert m["fid[digits-mlp]"] > 0
        assert all(math.isfinite(v) for v in m.values()) and m["fid[digits-cnn]"] > 0
        assert 0 <= m["class_accuracy"] <= 1 and m["reward[digits-class]"] <= 0
        assert r["n"] == N and r["seeds"] == [0, N - 1] and r["guidance"] == 2.0 and r["seconds_per_image"] > 0
        assert r["main_metric"] == "fid[digits-cnn]" and r["kind"] == "teacher"
        manifest, mlp = (ref["manifest"] for ref in r["references"])
        assert manifest["extractor"] == "digits-cnn" and manifest["n"] == 1797
        assert mlp["extractor"] == "digits-mlp" and mlp["n"] == 1797 and mlp["feature_dim"] == 64
        assert mlp["extractor_weights_sha256"] != manifest["extractor_weights_sha256"]
        assert mlp["reference"] == manifest["reference"]   # same real digits, its own statistics
        assert r["scorers"]["extra_extractors"][0]["id"] == "digits-mlp"
        assert r["scorers"]["clip"]["model"] == "micro-clip-digits" and r["scorers"]["rewards"][0]["name"] == "digits-class"
        assert (out / r["grid"]).is_file()
    assert rows[1]["speedup"] == pytest.approx(1.0)   # the 2-step teacher row is the slowest teacher row
    assert rows[0]["speedup"] == pytest.approx(rows[1]["seconds_per_image"] / rows[0]["seconds_per_image"])
    assert rows[1]["metrics"]["fid[digits-cnn]"] < rows[0]["metrics"]["fid[digits-cnn]"]   # 2 steps beat 1 step
    assert (out / "metric_vs_nfe.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| toy-digits")]
    assert len(table) == 2 and all(line in printed for line in table)
    section = results.read_text()
    assert "<!-- BEGIN toy-eval -->" in section and "fewstep " + " ".join(argv) in section and table[0] in section
    assert "already exists and is not empty" in fails(argv, capsys)   # never overwrites a report

    # the streamed FID equals the metric code run on the same images held in memory
    from fewstep.data.digits import class_balanced_prompts
    from fewstep.metrics.digits import score_digits
    from fewstep.models.teacher import load_teacher
    from fewstep.sampling.generate import generate_images

    teacher = load_teacher("toy-digits")
    images = generate_images(teacher, teacher.denoiser(), teacher.net, class_balanced_prompts(N), list(range(N)),
                             teacher.teacher_times(2), "ddim", 2.0)
    as_png = (images.clamp(0, 1) * 255).round().to(torch.uint8)   # what the harness scores: images as saved
    ref = score_digits(as_png, [i % 10 for i in range(N)])
    assert rows[1]["metrics"]["fid[digits-cnn]"] == pytest.approx(ref.fid, rel=1e-5)
    assert rows[1]["metrics"]["class_accuracy"] == pytest.approx(ref.class_accuracy)
    assert rows[1]["metrics"]["diversity"] == pytest.approx(ref.diversity, rel=1e-5)
    from fewstep.metrics.digits import digits_mlp_fid

    assert rows[1]["metrics"]["fid[digits-mlp]"] == pytest.approx(digits_mlp_fid(as_png), rel=1e-5)
    stored = sorted(p.name.split("-")[:2] for p in stats_dir.glob("toy-digits/*.json"))
    assert stored == [["digits", "cnn"], ["digits", "mlp"]]   # one stored reference per extractor


def test_teacher_fid_reference_is_stored_reused_and_guarded(stats_dir, tmp_path, capsys):
    base = ["eval", "toy-digits", "--protocol", "teacher-fid", "--num-images", str(N), "--set", "fid.teacher_steps=2",
            "--no-progress"]
    main(base + ["--steps", "1,2", "--out", str(tmp_path / "a")])
    rows = json.loads((tmp_path / "a" / "report.json").read_text())["rows"]
    one, two = (r["metrics"]["fid_vs_teacher[digits-cnn]"] for r in rows)
    assert abs(two) < 1e-6 and one > 1.0   # same steps and seeds: the same images; fewer steps: farther away
    assert [r["nfe"] for r in rows] == [1, 2]   # no CFG: one evaluation per step
    desc = rows[0]["references"][0]["manifest"]["reference"]
    assert desc["kind"] == "teacher" and desc["steps"] == 2 and desc["seeds"] == [0, N - 1]
    assert all("(computed)" in r["references"][0]["where"] for r in rows)   # once, used by both rows
    stored = list(stats_dir.glob("teacher-fid/*.json"))
    assert len(stored) == 1
    capsys.readouterr()
    main(base + ["--steps", "2", "--out", str(tmp_path / "b")])   # a new run reuses the stored statistics
    again = json.loads((tmp_path / "b" / "report.json").read_text())["rows"][0]
    assert "(reused)" in again["references"][0]["where"]
    assert again["metrics"]["fid_vs_teacher[digits-cnn]"] == pytest.approx(two, abs=1e-6)
    manifest = json.loads(stored[0].read_text())
    manifest["extractor_weights_sha256"] = "0" * 64
    stored[0].write_text(json.dumps(manifest))
    err = fails(base + ["--steps", "2", "--out", str(tmp_path / "c")], capsys)
    assert "does not match" in err and "extractor_weights_sha256" in err


def test_missing_coco_files_fail_with_one_line(stats_dir, tmp_path, capsys, monkeypatch):
    argv = ["eval", "toy-digits", "--protocol", "coco2014-30k", "--out", str(tmp_path / "x")]
    assert "FEWSTEP_COCO2014_CAPTIONS" in fails(argv, capsys)
    captions = tmp_path / "captions.txt"
    captions.write_text("a handwritten digit 3\n")
    monkeypatch.setenv("FEWSTEP_COCO2014_CAPTIONS", str(captions))
    assert "FEWSTEP_COCO2014_IMAGES" in fails(argv, capsys)
    monkeypatch.setenv("FEWSTEP_COCO2014_IMAGES", str(tmp_path / "nope"))
    err = fails(argv, capsys)
    assert "not found" in err and str(tmp_path / "nope") in err
    assert "FEWSTEP_COCO2017_CAPTIONS" in fails(["eval", "toy-digits", "--protocol", "coco2017-5k", "--out",
                                                 str(tmp_path / "y")], capsys)
    assert not (tmp_path / "x").exists()


def test_coco_style_folder_reference_with_local_files(stats_dir, tmp_path, monkeypatch):
    """The COCO code path (captions JSON, JPEG folder, centre crop + LANCZOS) with the digits extractor offline."""
    from PIL import Image

    folder = tmp_path / "val2017"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        arr = (torch.rand(20, 28, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:012d}.jpg")
    anns = [{"id": 100 + i, "image_id": i // 2, "caption": f"a handwritten digit {(i // 2) % 10}"} for i in range(48)]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": anns}))
    dummy = tmp_path / "dummy.pt"
    dummy.write_bytes(b"unused")
    for var, value in (("FEWSTEP_COCO2017_CAPTIONS", tmp_path / "captions.json"), ("FEWSTEP_COCO2017_IMAGES", folder),
                       ("FEWSTEP_INCEPTION_WEIGHTS", dummy), ("FEWSTEP_CLIP_VITG14", dummy)):
        monkeypatch.setenv(var, str(value))
    proto = load_protocol("coco2017-5k", ["fid.extractor=digits", "clip.model=none", "fid.eval_res=16"])
    assert proto.prompts.file == str(tmp_path / "captions.json") and proto.fid.reference_folder == str(folder)
    main(["eval", "toy-digits", "--protocol", "coco2017-5k", "--steps", "1", "--num-images", "20", "--out",
          str(tmp_path / "out"), "--no-progress", "--set", "fid.extractor=digits", "--set", "clip.model=none",
          "--set", "fid.eval_res=16"])
    row = json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]
    m = row["references"][0]["manifest"]
    assert m["reference"]["kind"] == "folder" and m["n"] == 24 and m["images"]["eval_res"] == 16
    assert math.isfinite(row["metrics"]["fid[digits-cnn]"]) and row["n"] == 20


def test_bad_protocols_are_refused(stats_dir, tmp_path, capsys):
    assert {"toy-digits", "teacher-fid", "coco2014-30k", "coco2017-5k", "geneval", "hpsv2"} <= set(list_protocols())
    err = fails(["eval", "toy-digits", "--protocol", "nope", "--out", str(tmp_path / "x")], capsys)
    assert "unknown protocol 'nope'" in err and "toy-digits" in err and "teacher-fid" in err
    err = fails(["eval", "toy-digits", "--protocol", "toy-digits", "--set", "fid.colour=1", "--out",
                 str(tmp_path / "x")], capsys)
    assert "fid.colour" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfid:\n  kid: maybe\n")
    with pytest.raises(FewstepError, match="fid.kid"):
        load_protocol(str(bad))
    with pytest.raises(FewstepError, match="FEWSTEP_GENEVAL_DETECTOR"):
        load_protocol("geneval")
    with pytest.raises(FewstepError, match="FEWSTEP_HPS_PROMPTS"):
        load_protocol("hpsv2")


def test_fid_extra_extractors_are_checked():
    proto = load_protocol("toy-digits")
    assert proto.fid.extractor == "digits" and proto.fid.extra_extractors == ["digits-mlp"]
    assert load_protocol("teacher-fid").fid.extra_extractors == []   # other presets unchanged
    assert load_protocol("toy-digits", ["fid.extractor=digits-mlp", "fid.extra_extractors=[digits]"]).fid.extractor \
        == "digits-mlp"
    with pytest.raises(FewstepError, match="fid.extra_extractors.0='inception'"):
        load_protocol("toy-digits", ["fid.extra_extractors=[inception]"])
    with pytest.raises(FewstepError, match="must not repeat"):
        load_protocol("toy-digits", ["fid.extra_extractors=[digits]"])
    with pytest.raises(FewstepError, match="needs fid.extractor"):
        load_protocol("toy-digits", ["fid.extractor=none", "fid.reference=none"])


def test_toy_protocol_tiny_run_has_both_fids(stats_dir):
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes.base import InferenceSpec

    teacher = load_teacher("toy-digits")
    spec = InferenceSpec(times=[float(t) for t in teacher.teacher_times(1)], step="ddim", guidance_scale=1.0)
    got = evaluate_during_training(teacher, teacher.net, spec, "toy-digits", 6)
    assert math.isfinite(got["fid[digits-cnn]"]) and math.isfinite(got["fid[digits-mlp]"])
    assert got["fid[digits-cnn]"] != got["fid[digits-mlp]"]


def test_trainer_hook_scores_a_network_without_writing(stats_dir):
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes.base import InferenceSpec

    teacher = load_teacher("toy-digits")
    spec = InferenceSpec(times=[float(t) for t in teacher.teacher_times(2)], step="ddim", guidance_scale=1.0)
    got = evaluate_during_training(teacher, teacher.net, spec, "toy-digits", 20)
    assert {"fid[digits-cnn]", "class_accuracy", "diversity", "clip_score[micro-clip-digits]"} <= set(got)
    assert all(isinstance(v, float) and math.isfinite(v) for v in got.values())
    vs_teacher = evaluate_during_training(teacher, teacher.net, spec, "teacher-fid", 20,
                                          overrides=["fid.teacher_steps=2", "fid.kid=false"])
    assert abs(vs_teacher["fid_vs_teacher[digits-cnn]"]) < 1e-4   # the network is the teacher itself (N < dim: sqrtm eps)
    assert not stats_dir.exists()   # no file output


def test_teacher_and_student_options_are_separate(tmp_path):
    from fewstep.eval.run import EvalOptions, export_meta, model_settings

    export = tmp_path / "export"
    export.mkdir()
    (export / "fewstep.json").write_text('{"recipe": "lcm", "times": [1.0, 0.0]}')
    opts = EvalOptions(steps=[1, 2, 4, 8, 50], guidance=2.0, student_steps=None, student_guidance=None)
    assert export_meta("toy-digits") is None and export_meta(str(export)) == {"recipe": "lcm", "times": [1.0, 0.0]}
    assert model_settings(export_meta("toy-digits"), opts) == ([1, 2, 4, 8, 50], 2.0)
    assert model_settings(export_meta(str(export)), opts) == (None, None)   # the export's own steps and guidance
    assert model_settings(export_meta(str(export)), EvalOptions(student_steps=[2], student_guidance=1.5)) == ([2], 1.5)
