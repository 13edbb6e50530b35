"""The embedded toy-digits teacher: tokenizer, text encoder, training loops, pipeline round trip, shipped asset."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewstep.data.digits import (class_balanced_prompts, classify_nearest_mean, digit_class_means,  # noqa: E402
                                 digit_prompt, load_digit_images, parse_digit)
from fewstep.models import toy_teacher as tt  # noqa: E402
from fewstep.models.toy_tokenizer import build_tokenizer  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "toy-digits"
TINY_UNET = dict(block_out_channels=(16, 16), norm_num_groups=8, attention_head_dim=2)
TINY_VAE = dict(block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models gain little from a second thread, and two OpenMP threads competing with other jobs for
    two cores run up to 10x slower (measured); restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return load_digit_images(16)


def test_digit_images_round_trip_to_8x8(digits):
    x, y = digits
    assert x.shape == (1797, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1 and x.mean() < -0.3  # dark background, bright ink
    from sklearn.datasets import load_digits

    back = (F.avg_pool2d(x[:, :1], 2) + 1) / 2 * 16
    assert torch.allclose(back.squeeze(1), torch.as_tensor(load_digits().images, dtype=torch.float32), atol=1e-4)


def test_prompts():
    assert digit_prompt(3) == "a handwritten digit 3"
    assert [parse_digit(digit_prompt(d)) for d in range(10)] == list(range(10))
    assert parse_digit("") is None and parse_digit("a cat") is None
    assert class_balanced_prompts(12)[10] == digit_prompt(0) and len(class_balanced_prompts(12)) == 12


@pytest.mark.parametrize("on_disk", [False, True])
def test_tokenizer(tmp_path, on_disk):
    tok = build_tokenizer(tmp_path if on_disk else None)
    assert len(tok) == 56 and tok.model_max_length == 16
    ids = [tok(digit_prompt(d)).input_ids for d in range(10)]
    assert all(len(i) == 6 and i[:4] == ids[0][:4] for i in ids)  # bos, "a", "handwritten", "digit", d, eos
    assert len({i[4] for i in ids}) == 10
    assert tok("", padding="max_length", max_length=16).input_ids == [0] + [1] * 15


def test_text_embeddings_distinct():
    table = tt.prompt_table(build_tokenizer(), tt.build_text_encoder(0))
    assert table.shape == (11, 16, 64) and torch.isfinite(table).all()
    dist = torch.cdist(table.flatten(1), table.flatten(1))
    assert dist[~torch.eye(11, dtype=torch.bool)].min() > 0.5
    assert torch.equal(table, tt.prompt_table(build_tokenizer(), tt.build_text_encoder(0)))  # seeded


def test_train_vae_and_unet_three_steps(digits):
    x, y = digits[0][:32], digits[1][:32]
    vae = tt.build_vae(0, **TINY_VAE)
    before = [p.detach().clone() for p in vae.parameters()]
    losses = tt.train_vae(vae, x, 3, batch_size=8, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, vae.parameters()))
    mean, std = tt.encode_posteriors(vae, x)
    sf = tt.latent_scaling_factor(mean, std)
    assert mean.shape == (32, 4, 8, 8) and sf > 0
    table = tt.prompt_table(build_tokenizer(), tt.build_text_encoder(0))
    unet = tt.build_unet(0, **TINY_UNET)
    before = [p.detach().clone() for p in unet.parameters()]
    ema, losses = tt.train_unet(unet, mean, std, y, table, sf, 3, batch_size=8, warmup=2, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, unet.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(before, ema.parameters()))  # EMA moved too


def test_warmup_cosine():
    assert tt.warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert tt.warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert tt.warmup_cosine(100, 10, 100) == pytest.approx(0.1)


def test_tiny_pipeline_save_reload_runs(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tt.build_pipeline(tt.build_vae(0, **TINY_VAE), tt.build_text_encoder(0), build_tokenizer(),
                             tt.build_unet(0, **TINY_UNET))
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    re = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert len(re.tokenizer) == 56 and re.scheduler.config.timestep_spacing == "trailing"
    re.set_progress_bar_config(disable=True)
    a = tt.sample_images(re, ["a handwritten digit 4", ""], steps=2, guidance=2.0, seed=1)
    b = tt.sample_images(pipe, ["a handwritten digit 4", ""], steps=2, guidance=2.0, seed=1)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-5)


def test_nearest_mean_classifier_on_real_digits(digits):
    x, y = digits
    acc = (classify_nearest_mean(x, digit_class_means()) == y).float().mean()
    assert acc > 0.85


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="toy-digits asset not built")
def test_shipped_toy_digits_generates_prompted_class():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ASSET), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert not list(ASSET.rglob("*.bin")) and len(pipe.tokenizer) == 56
    imgs = tt.sample_images(pipe, class_balanced_prompts(40), steps=50, guidance=2.0, seed=123)
    assert imgs.shape == (40, 3, 16, 16)
    assert imgs.mean() < -0.3  # dataset polarity: mostly dark background
    acc = (classify_nearest_mean(imgs, digit_class_means()) == torch.arange(40) % 10).float().mean()
    assert acc >= 0.8, f"class accuracy {acc:.2f}"
