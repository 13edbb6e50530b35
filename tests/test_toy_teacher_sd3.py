"""The embedded flow teacher toy-digits-sd3: parts, training loop, the recorded call defaults, the shipped asset."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.data.digits import class_balanced_prompts, classify_nearest_mean, digit_class_means  # noqa: E402
from fewstep.data.digits import load_digit_images  # noqa: E402
from fewstep.models import toy_teacher as tt  # noqa: E402
from fewstep.models import toy_teacher_sd3 as ts  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "toy-digits-sd3"
TINY = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_pipe():
    return ts.build_pipeline(ts.load_toy_vae(), ts.build_text_encoders(0), ts.build_transformer(0, **TINY))


def test_prompt_table_is_the_pipelines_encoding_at_8_tokens(tiny_pipe):
    context, pooled = ts.prompt_table(tiny_pipe)
    assert context.shape == (11, 2 * ts.TOKENS, 128) and pooled.shape == (11, 128)
    assert torch.count_nonzero(context[:, ts.TOKENS:]) == 0       # the empty T5 slot: zeros
    dist = torch.cdist(pooled, pooled)
    assert dist[~torch.eye(11, dtype=torch.bool)].min() > 1e-2    # every prompt (and "") distinct
    assert torch.equal(context, ts.prompt_table(tiny_pipe)[0])


def test_training_times_are_shifted_logit_normal():
    t = ts.training_times(20000, 3.0, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    # logit-normal(0, 1) has median 1/2; the static shift 3 maps it to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    plain = ts.training_times(20000, 1.0, torch.Generator().manual_seed(0))
    assert plain.median().item() == pytest.approx(0.5, abs=0.01)


def test_flow_loss_is_zero_for_the_exact_velocity():
    """The target is u = noise - z0 at x_t = (1 - t) z0 + t noise: a network returning it has zero loss."""
    z0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(4)

    class Oracle(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            tt_ = (timestep / 1000).view(-1, 1, 1, 1)
            assert torch.allclose(hidden_states, (1 - tt_) * z0 + tt_ * noise, atol=1e-6)
            return type("Out", (), {"sample": noise - z0})()

    assert ts.flow_loss(Oracle(), z0, t, noise, torch.zeros(4, 16, 128), torch.zeros(4, 128)).item() < 1e-10


def test_train_three_steps_save_and_reload(tiny_pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from fewstep.models.teacher import load_teacher

    x, y = load_digit_images(16)
    mean, std = tt.encode_posteriors(tiny_pipe.vae, x[:32])
    net = tiny_pipe.transformer
    before = [p.detach().clone() for p in net.parameters()]
    ema, losses = ts.train_transformer(net, mean, std, y[:32], ts.prompt_table(tiny_pipe), 1.0, 3, batch_size=8,
                                       warmup=2, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(before, ema.parameters()))
    tiny_pipe.transformer = ema
    ts.save_teacher(tiny_pipe, tmp_path / "t")
    index = json.loads((tmp_path / "t" / "model_index.json").read_text())
    assert index["_fewstep_call_defaults"] == {"max_sequence_length": ts.TOKENS}
    assert index["text_encoder_3"] == [None, None] and not list((tmp_path / "t").rglob("*.bin"))
    # the stock loader needs the empty slots passed explicitly; fewstep's loader passes them itself
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path / "t", text_encoder_3=None, tokenizer_3=None)
    teacher = load_teacher(str(tmp_path / "t"))
    assert teacher.family.name == "sd3" and teacher.size == 16 and teacher.latent_shape() == (4, 8, 8)
    ours = teacher.encode_prompts(["a handwritten digit 4"])
    emb, _, pooled, _ = stock.encode_prompt("a handwritten digit 4", None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=ts.TOKENS)
    assert ours["encoder_hidden_states"].shape == (1, 16, 128)
    assert torch.equal(ours["encoder_hidden_states"], emb) and torch.equal(ours["pooled_projections"], pooled)
    default, *_ = stock.encode_prompt("a handwritten digit 4", None, None, do_classifier_free_guidance=False)
    assert default.shape[1] == ts.TOKENS + 256     # what a stock call without the recorded argument would feed


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="toy-digits-sd3 asset not built")
def test_shipped_teacher_generates_the_prompted_class_in_the_stock_pipeline():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSET), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert not list(ASSET.rglob("*.bin")) and pipe.scheduler.config.shift == ts.SHIFT
    assert sum(f.stat().st_size for f in ASSET.rglob("*.safetensors")) < 20e6
    imgs = tt.sample_images(pipe, class_balanced_prompts(40), steps=50, guidance=2.0, seed=123, **ts.CALL_DEFAULTS)
    assert imgs.shape == (40, 3, 16, 16) and imgs.mean() < -0.3   # dataset polarity: mostly dark background
    acc = (classify_nearest_mean(imgs, digit_class_means()) == torch.arange(40) % 10).float().mean()
    assert acc >= 0.8, f"class accuracy {acc:.2f}"


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="toy-digits-sd3 asset not built")
def test_eval_and_bench_accept_the_preset(tmp_path, monkeypatch):
    """`fewstep eval` with the toy protocol scores the flow teacher (8 Euler steps beat 1 on both digits feature
    spaces), and `bench --compare-stock` times it against the stock SD3 pipeline called with the recorded
    max_sequence_length (not 8 + 256 tokens)."""
    from fewstep.bench import run_bench
    from fewstep.bench.sides import stock_kwargs
    from fewstep.cli import main
    from fewstep.models.teacher import load_teacher

    monkeypatch.setenv("FEWSTEP_STATS_DIR", str(tmp_path / "stats"))
    out = tmp_path / "eval"
    main(["eval", "toy-digits-sd3", "--protocol", "toy-digits", "--steps", "1,8", "--num-images", "30", "--guidance",
          "1", "--out", str(out), "--no-progress", "--results", str(tmp_path / "r.md"), "--section", "sd3",
          "--device", "cpu"])
    one, eight = (r["metrics"] for r in json.loads((out / "report.json").read_text())["rows"])
    assert eight["fid[digits-cnn]"] < one["fid[digits-cnn]"] and eight["fid[digits-mlp]"] < one["fid[digits-mlp]"]
    assert eight["class_accuracy"] >= 0.9   # (one Euler step gives each class's blurred mean: also classified right)
    assert "| toy-digits-sd3 | teacher | 8 |" in (tmp_path / "r.md").read_text()

    row = run_bench("toy-digits-sd3", [1], [2], guidance=2.0, compare_stock=True, repeats=1, progress=False)[0]
    assert row.teacher == "toy-digits-sd3" and row.resolution == 16 and row.nfe == 2
    assert row.engine.forward_rows == row.stock.forward_rows == 4
    assert row.stock_ratio > 0 and math.isfinite(row.stock_ratio)
    assert stock_kwargs(load_teacher("toy-digits-sd3"), None, [1.0, 0.0])["max_sequence_length"] == ts.TOKENS
