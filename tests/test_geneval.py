"""GenEval-style scoring: prompt data, folder layout, rule engine on synthetic scenes, hue colours, report.

These are logic tests with an oracle detector and a hue colour classifier (evaluation notes §4.4, §7 item 6);
they check the rules, not any real detector, and produce no GenEval score.
"""
import colorsys
import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewstep.errors import FewstepError  # noqa: E402
from fewstep.eval import geneval as ge  # noqa: E402

PROMPTS = ge.load_geneval_prompts()
DETECTOR = ge.SyntheticSceneDetector()
HUE = ge.HueColorClassifier()


def first(tag, pred=lambda p: True):
    """The first shipped prompt with this tag that satisfies ``pred``."""
    return next(p for p in PROMPTS if p.tag == tag and pred(p))


def obj(cls, cx, cy, color="red", half=10, score=0.99, shape="rect"):
    """A scene object centred at (cx, cy) with a square box of side 2*half+1."""
    return {"class": cls, "box": [cx - half, cy - half, cx + half, cy + half], "color": color, "score": score,
            "shape": shape}


def judge(prompt, objects, size=(128, 128)):
    """Draw the scene, run the oracle detector on it and score it against ``prompt``."""
    image = ge.draw_scene(objects, size)
    return ge.score_prompt(prompt, DETECTOR.detect(image), image, HUE)


def row(n, cls, color="red", y=64):
    """``n`` objects of one class in a row."""
    return [obj(cls, 16 + 24 * i, y, color) for i in range(n)]


# ------------------------------------------------------------------------------------------ prompt data
def test_prompts_load_with_the_six_tags_and_counts():
    assert len(PROMPTS) == 553
    assert Counter(p.tag for p in PROMPTS) == {"single_object": 80, "two_object": 99, "counting": 80,
                                               "colors": 94, "position": 100, "color_attr": 100}
    counts = Counter(p.include[0]["count"] for p in PROMPTS if p.tag == "counting")
    assert counts == {2: 26, 3: 28, 4: 26}
    assert all(p.exclude == [{"class": p.include[0]["class"], "count": p.include[0]["count"] + 1}]
               for p in PROMPTS if p.tag == "counting")
    relations = Counter(p.include[1]["position"][0] for p in PROMPTS if p.tag == "position")
    assert relations == {"below": 28, "right of": 27, "above": 26, "left of": 19}
    names = ge.load_object_names()
    assert len(names) == 80 and names[0] == "person"
    assert {i["class"] for p in PROMPTS for i in p.include} <= set(names)
    assert {i["color"] for p in PROMPTS for i in p.include if "color" in i} == set(ge.COLORS)


def test_shipped_metadata_is_the_official_file_and_round_trips():
    path = ge.GENEVAL_DIR / "evaluation_metadata.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ge.METADATA_SHA256
    lines = path.read_text().splitlines()
    assert [json.dumps(p.to_dict()) for p in PROMPTS] == lines
    assert (ge.GENEVAL_DIR / "LICENSE").read_text().startswith("MIT License")
    with pytest.raises(ValueError):
        ge.GenEvalPrompt.from_dict({"tag": "nonsense", "include": [], "prompt": "x"})


def test_preset_matches_documented_thresholds():
    cfg = ge.load_geneval_config()
    assert cfg == ge.GenEvalConfig()
    assert (cfg.threshold, cfg.counting_threshold, cfg.max_objects, cfg.max_overlap, cfg.position_threshold) == (
        0.3, 0.9, 16, 1.0, 0.1)
    assert cfg.images_per_prompt == 4


# ------------------------------------------------------------------------------------------ layout
def test_folder_layout_round_trips(tmp_path):
    slots = ge.geneval_layout(tmp_path, PROMPTS[:3], n_per_prompt=4, base_seed=42)
    assert [s.folder.name for s in slots] == ["00000", "00001", "00002"]
    assert slots[1].seeds == [46, 47, 48, 49] and ge.geneval_seed(2, 3, 4, 42) == 53
    assert slots[2].image_paths[3] == tmp_path / "00002" / "samples" / "0003.png"
    for slot in slots:
        meta = json.loads((slot.folder / "metadata.jsonl").read_text())
        assert ge.GenEvalPrompt.from_dict(meta) == slot.prompt
    scene = ge.draw_scene([obj("bench", 40, 40, "blue")], (64, 64))
    paths = ge.write_geneval_images(tmp_path, 1, PROMPTS[1], [scene, scene.copy()])
    assert [p.name for p in paths] == ["0000.png", "0001.png"] and paths[0] == slots[1].image_paths[0]
    with Image.open(paths[1]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(scene))
        assert json.loads(im.info[ge.SCENE_KEY])[0]["class"] == "bench"


# ------------------------------------------------------------------------------------------ colours
def test_hue_classifier_names_pure_colours():
    pure = {"red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
            "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 192, 203), "brown": (139, 69, 19),
            "black": (0, 0, 0), "white": (255, 255, 255)}
    for name, rgb in [*pure.items(), *ge.CANONICAL_RGB.items()]:
        assert ge.hsv_color_name(*colorsys.rgb_to_hsv(*(v / 255 for v in rgb))) == name, (name, rgb)
    for name in ge.COLORS:  # through pixels: a mask (ellipse) and a box-only detection
        image = ge.draw_scene([obj("cup", 32, 32, name, half=12, shape="ellipse")], (64, 64))
        det = DETECTOR.detect(image)[0]
        assert HUE.color(image, det) == name
        assert HUE.color(image, ge.Detection("cup", 0.9, (28, 28, 36, 36))) == name


# ------------------------------------------------------------------------------------------ rule engine
def test_single_and_two_object():
    single = first("single_object")
    cls = single.include[0]["class"]
    assert judge(single, [obj(cls, 64, 64)]) == (True, "")
    ok, reason = judge(single, [obj("zebra" if cls != "zebra" else "cow", 64, 64)])
    assert not ok and cls in reason
    assert not judge(single, [obj(cls, 64, 64, score=0.25)])[0]  # below the 0.3 detection threshold
    two = first("two_object")
    a, b = (i["class"] for i in two.include)
    assert judge(two, [obj(a, 30, 64), obj(b, 90, 64, "blue")])[0]
    ok, reason = judge(two, [obj(a, 30, 64)])  # missing second object
    assert not ok and f"expected 1 {b}, found 0" in reason


@pytest.mark.parametrize("n", [2, 3, 4])
def test_counting_exact(n):
    prompt = first("counting", lambda p: p.include[0]["count"] == n)
    cls = prompt.include[0]["class"]
    assert judge(prompt, row(n, cls)) == (True, "")
    ok, reason = judge(prompt, row(n + 1, cls))  # one too many
    assert not ok and f"fewer than {n + 1}" in reason
    assert not judge(prompt, row(n - 1, cls))[0]  # one too few
    # counting uses the 0.9 threshold: an extra 0.5-score object is not counted, a missing 0.5 one is missing
    assert judge(prompt, row(n, cls) + [{**obj(cls, 64, 110), "score": 0.5}])[0]
    assert not judge(prompt, row(n - 1, cls) + [{**obj(cls, 64, 110), "score": 0.5}])[0]


@pytest.mark.parametrize("color", ge.COLORS)
def test_colors_each_colour(color):
    prompt = first("colors", lambda p: p.include[0]["color"] == color)
    cls = prompt.include[0]["class"]
    assert judge(prompt, [obj(cls, 64, 64, color, half=20)]) == (True, "")
    wrong = "blue" if color != "blue" else "yellow"
    ok, reason = judge(prompt, [obj(cls, 64, 64, wrong, half=20)])
    assert not ok and f"{color} {cls}" in reason and wrong in reason


def test_color_attribute_binding():
    prompt = first("color_attr")
    (a, ca), (b, cb) = ((i["class"], i["color"]) for i in prompt.include)
    assert judge(prompt, [obj(a, 30, 64, ca), obj(b, 90, 64, cb)]) == (True, "")
    ok, reason = judge(prompt, [obj(a, 30, 64, cb), obj(b, 90, 64, ca)])  # colours swapped between objects
    assert not ok and reason.count("colours were") == 2
    assert not judge(prompt, [obj(a, 30, 64, ca)])[0]


PLACE = {"left of": ((30, 64), (98, 64)), "right of": ((98, 64), (30, 64)),
         "above": ((64, 30), (64, 98)), "below": ((64, 98), (64, 30))}


@pytest.mark.parametrize("relation", ge.RELATIONS)
def test_position(relation):
    prompt = first("position", lambda p: p.include[1]["position"][0] == relation)
    target, mover = prompt.include[0]["class"], prompt.include[1]["class"]
    (mx, my), (tx, ty) = PLACE[relation]
    assert judge(prompt, [obj(target, tx, ty), obj(mover, mx, my, "blue")]) == (True, "")
    ok, reason = judge(prompt, [obj(target, mx, my), obj(mover, tx, ty, "blue")])  # swapped
    assert not ok and f"expected {mover} {relation} {target}" in reason
    ok, reason = judge(prompt, [obj(mover, mx, my, "blue")])  # no target object
    assert not ok and f"no matched {target}" in reason


def test_relative_position_margin_and_diagonals():
    a, b = (0, 0, 20, 20), (30, 0, 50, 20)
    assert ge.relative_position(a, b) == {"left of"} and ge.relative_position(b, a) == {"right of"}
    assert ge.relative_position((0, 0, 20, 20), (3, 0, 23, 20)) == set()  # 3 px < 0.1 * (20 + 20) margin
    assert ge.relative_position((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}  # diagonal: both
    assert ge.relative_position((0, 0, 10, 10), (40, 0, 50, 10), threshold=2.0) == set()


def test_filtering_threshold_cap_and_nms():
    dets = [ge.Detection("cat", s, (0, 0, 10, 10)) for s in (0.95, 0.5, 0.31, 0.3, 0.1)]
    assert [d.score for d in ge.filter_detections(dets, "single_object")["cat"]] == [0.95, 0.5, 0.31]
    assert [d.score for d in ge.filter_detections(dets, "counting")["cat"]] == [0.95]
    many = [ge.Detection("cat", 0.5 + i / 100, (i, 0, i + 5, 5)) for i in range(20)]
    assert len(ge.filter_detections(many, "two_object")["cat"]) == 16
    nms = ge.GenEvalConfig(max_overlap=0.5)
    assert len(ge.filter_detections(dets, "single_object", nms)["cat"]) == 1  # identical boxes collapse
    assert ge.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ detectors
def test_interfaces_and_missing_transformers_weights(tmp_path):
    assert isinstance(DETECTOR, ge.Detector) and isinstance(HUE, ge.ColorClassifier)
    missing = tmp_path / "detr-resnet-50"
    with pytest.raises(FileNotFoundError, match="detr-resnet-50") as err:
        ge.TransformersDetector(missing)
    assert isinstance(err.value, FewstepError) and "config.json" in str(err.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ge.TransformersDetector(missing)
    assert ge.to_geneval_name("motorbike") == "motorcycle" and ge.to_geneval_name("teddy_bear") == "teddy bear"
    assert ge.to_geneval_name("TV") == "tv" and ge.to_geneval_name("N/A") is None
    with pytest.raises(ValueError, match="draw_scene"):
        DETECTOR.detect(Image.new("RGB", (8, 8)))


@pytest.mark.slow
def test_transformers_detector_on_tiny_local_detr(tmp_path):
    """Loads a tiny random DETR from a local folder (no hub); slow because importing DETR takes ~10 s on CPU."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    labels = {0: "N/A", 1: "person", 2: "motorbike", 3: "dog", 4: "teddy_bear"}
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=8, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    model = DetrForObjectDetection(cfg)
    with torch.no_grad():
        model.class_labels_classifier.bias[2] += 5.0  # make every query a "motorbike"
    model.save_pretrained(tmp_path)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(tmp_path)
    det = ge.TransformersDetector(tmp_path, min_score=0.0)
    assert det.label_map == {0: None, 1: "person", 2: "motorcycle", 3: "dog", 4: "teddy bear"}
    found = det.detect(Image.new("RGB", (80, 60), (10, 200, 30)))
    assert len(found) == 8 and {d.label for d in found} == {"motorcycle"} and all(0 < d.score <= 1 for d in found)
    assert all(0 <= d.box[0] <= d.box[2] <= 80 and 0 <= d.box[1] <= d.box[3] <= 60 for d in found)


# ------------------------------------------------------------------------------------------ run + report
def test_score_run_report_is_mean_of_task_means(tmp_path):
    single, count2 = first("single_object"), first("counting", lambda p: p.include[0]["count"] == 2)
    single2 = first("single_object", lambda p: p.prompt != single.prompt)
    colors = first("colors", lambda p: p.include[0]["color"] == "green")
    c1, c2, c3 = (p.include[0]["class"] for p in (single, count2, colors))
    scenes = [  # (prompt, 4 images); per-task accuracy 1.0, 0.5, 0.25 over 8/4/4 images
        (single, [[obj(c1, 64, 64)]] * 4),
        (single2, [[obj(single2.include[0]["class"], 40, 40)]] * 4),
        (count2, [row(2, c2), row(2, c2), row(3, c2), row(1, c2)]),
        (colors, [[obj(c3, 64, 64, "green", half=20)]] + [[obj(c3, 64, 64, "red", half=20)]] * 3),
    ]
    for index, (prompt, objs) in enumerate(scenes):
        ge.write_geneval_images(tmp_path, index, prompt, [ge.draw_scene(o) for o in objs])
    (tmp_path / "00002" / "samples" / "notes.png").write_bytes(b"")  # not \d+.png: ignored
    report = ge.score_run(tmp_path, DETECTOR, HUE)
    assert report.per_task == {"single_object": 1.0, "counting": 0.5, "colors": 0.25}
    assert report.overall == pytest.approx(np.mean([1.0, 0.5, 0.25]))
    assert report.image_accuracy == pytest.approx(11 / 16) and report.overall != report.image_accuracy
    assert (report.n_images, report.n_prompts, report.prompt_accuracy) == (16, 4, 1.0)
    assert report.label == "GenEval-style (detector=synthetic-oracle)"
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata",
                                                "details"}
    assert sum(r["correct"] for r in rows) == 11 and json.loads(rows[0]["metadata"]) == single.to_dict()
    official = ge.score_run(tmp_path, DETECTOR, HUE, official=True, results_path=tmp_path / "r2.jsonl")
    assert official.label == "GenEval" and official.to_dict()["overall"] == report.overall
    with pytest.raises(FewstepError):
        ge.score_run(tmp_path / "00000" / "samples", DETECTOR, HUE)
