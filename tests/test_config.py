"""Config loading is strict: every bad input is one FewstepError naming the problem and the valid choices."""
from pathlib import Path

import pytest

from fewstep.config import RECIPE_DIR, available, load_config
from fewstep.errors import FewstepError


def test_defaults_and_overrides():
    cfg = load_config(["recipe=lcm", "train.steps=7", "student.lora.rank=4", "method.loss=l2"])
    assert cfg.algorithm == "lcm" and cfg.model == "toy-digits"
    assert cfg.train.steps == 7 and cfg.student.lora.rank == 4 and cfg.method.loss == "l2"
    assert cfg.output_dir == "runs/lcm-toy-digits"


def test_yaml_words_stay_strings_for_string_settings():
    """`no` is YAML 1.1 for False; on the command line it must stay the string a string setting expects."""
    cfg = load_config(["recipe=lcm", "train.mixed_precision=no", "train.progress=no", "student.lora.rank=4"])
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False


def test_model_presets_layer_on_top():
    cfg = load_config(["recipe=lcm", "model=sdxl", "data.path=/data/x"])
    assert cfg.teacher.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.student.lora.rank == 64          # recipes/lcm/sdxl.yaml
    assert cfg.teacher.resolution == 1024


def test_every_shipped_recipe_and_model_validates():
    for recipe in available():
        for model in available("models"):
            load_config([f"recipe={recipe}", f"model={model}", "data.path=/x", "method.pairs_path=/pairs"]
                        if recipe == "dmd" else [f"recipe={recipe}", f"model={model}", "data.path=/x"])


WIDE = ("[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
        "downsamplers.0.conv,upsamplers.0.conv,time_emb_proj]")


@pytest.mark.parametrize("recipe,measured", [
    # the overrides that trained the DMD2-LoRA and TDM-LoRA rows of docs/results.md (toy-students) and the lcm-full
    # rows of toy-lcm-lora, before these settings became the mode layers
    ("dmd2", ["student.mode=lora", "method.critic_mode=lora", "train.lr=1e-3", f"student.lora.targets={WIDE}"]),
    ("tdm", ["student.mode=lora", "method.critic_mode=lora", f"student.lora.targets={WIDE}", "student.lora.rank=16",
             "student.lora.alpha=16", "method.critic_rank=16", "method.critic_alpha=16", "train.lr=1e-3"]),
    ("lcm", ["student.mode=full", "train.lr=2e-4"]),
])
def test_student_mode_layer_is_the_measured_setting(recipe, measured):
    """`student.mode=lora` alone (or `full` for LCM) picks recipes/<recipe>/toy-digits.<mode>.yaml, which must be
    exactly the configuration the results tables measured; the command line still overrides it."""
    base = [f"recipe={recipe}", "model=toy-digits"]
    mode = measured[0]
    assert load_config(base + [mode]) == load_config(base + measured)
    assert load_config(base + [mode, "train.lr=5e-4"]).train.lr == 5e-4
    default = load_config(base)
    assert default.student.mode != mode.split("=")[1] and default != load_config(base + measured)


def test_every_shipped_mode_layer_validates():
    layers = sorted(RECIPE_DIR.glob("*/*.*.yaml"))
    assert layers, "no mode layers found"
    for layer in layers:
        model, mode = layer.stem.rsplit(".", 1)
        cfg = load_config([f"recipe={layer.parent.name}", f"model={model}", f"student.mode={mode}"])
        assert cfg.student.mode == mode


@pytest.mark.parametrize("argv,needle", [
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["model=sd9"], "unknown model 'sd9'"),
    (["train.stepz=3"], "unknown config key 'train.stepz'; valid keys under train: ["),
    (["train.steps=many"], "bad value for 'train.steps'"),
    (["student.mode=half"], "choose one of ['lora', 'full']"),
    (["data.source=web"], "data.source"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["steps"], "arguments must be key=value"),
    (["attention=fast"], "attention"),
    (["data.num_workers=2"], "unknown config key 'data.num_workers'"),        # never read: removed, not ignored
    (["teacher.guidance_scale=3.5"], "unknown config key 'teacher.guidance_scale'"),
])
def test_bad_input_is_one_clear_error(argv, needle):
    with pytest.raises(FewstepError) as info:
        load_config(argv)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "broken.yaml").write_text("algorithm: lcm\ntrain: [unclosed\n")
    (tmp_path / "models" / "toy-digits.yaml").write_text("teacher: {pretrained: toy-digits}\n")
    with pytest.raises(FewstepError, match="malformed YAML"):
        load_config(["recipe=broken"], recipe_dir=tmp_path)


def test_missing_dataset_path_is_reported():
    with pytest.raises(FewstepError, match="data.path is required for data.source=folder"):
        load_config(["recipe=lcm", "model=sd15"])


def test_explicit_student_times_move_down_to_the_teacher_table():
    """sample.timesteps between DDPM-table entries land on the entry at or below (what a stock LCMScheduler can
    run); the toy DMD2 preset's 0.5/0.375/0.25/0.125 become 499/374/249/124; times that collide are refused."""
    from fewstep.models.teacher import load_teacher
    from fewstep.recipes.build import inference_spec

    teacher = load_teacher("toy-digits")
    spec = inference_spec(load_config(["recipe=dmd2", "model=toy-digits"]), teacher, "consistency")
    assert [round(t * 999, 9) for t in spec.times] == [499, 374, 249, 124, 0]
    exact = inference_spec(load_config(["recipe=dmd2", "sample.timesteps=[0.4994994994994995]"]), teacher, "ddim")
    assert round(exact.times[0] * 999, 9) == 499                     # already on the table: unchanged
    with pytest.raises(FewstepError, match="distinct teacher timesteps"):
        inference_spec(load_config(["recipe=dmd2", "sample.timesteps=[0.5,0.4999]"]), teacher, "ddim")


def test_every_string_setting_has_its_choices_checked_at_load():
    """A new string setting must be listed in METHOD_CHOICES (or name a path), so its value is checked when the
    config loads instead of at the first training step."""
    from dataclasses import fields

    from fewstep.methods import METHOD_CHOICES, METHODS

    for algorithm, cls in METHODS.items():
        for f in fields(cls):
            if f.type in ("str", str) and not f.name.endswith("_path"):
                assert f.name in METHOD_CHOICES.get(algorithm, {}), (algorithm, f.name)
                assert getattr(cls(), f.name) in METHOD_CHOICES[algorithm][f.name]


def test_lr_schedules_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    from fewstep.config import LR_SCHEDULES

    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("extra,needle", [
    (["method.backward_simulation=false"], "method.backward_simulation=false needs real images"),
    (["method.gan_critic_weight=0.01"], "the GAN term needs real images"),
])
def test_dmd2_terms_that_need_real_images_are_refused_at_load_for_prompt_data(extra, needle):
    with pytest.raises(FewstepError, match=needle):
        load_config(["recipe=dmd2", "data.source=prompts", "data.path=/p.txt", *extra])
