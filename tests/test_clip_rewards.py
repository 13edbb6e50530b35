"""CLIP score, the shipped micro-CLIP and the reward adapters, offline on tiny local files (evaluation.md 6-7)."""
import json

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.metrics import rewards
from fewstep.metrics.clip_score import ClipScorer, apply_scale, load_open_clip
from fewstep.metrics.micro_clip import DEFAULT_CONFIG, digit_images, digit_prompts, evaluate_micro_clip, load_micro_clip

TINY_OPEN_CLIP = {  # same ViT/text-transformer family as ViT-H-14 / ViT-L-14, a few thousand times smaller
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def micro():
    return load_micro_clip()


@pytest.fixture(scope="module")
def real_digits():
    return digit_images()


def _images(n=4, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_micro_clip_matched_above_shuffled(micro):
    m = evaluate_micro_clip(micro)
    assert m["n"] == 1797
    assert m["matched"] > m["shuffled"] + 25.0, m
    assert m["zero_shot_accuracy"] > 0.8, m
    assert micro.describe()["model"] == "micro-clip-digits" and len(micro.describe()["weights_sha256"]) == 64


def test_clip_score_is_differentiable(micro, real_digits):
    x, y = real_digits
    images = torch.nn.functional.interpolate(x[:8], size=32, mode="nearest").requires_grad_(True)  # resized inside
    prompts = [digit_prompts()[int(c)] for c in y[:8]]
    score = micro.score(images, prompts)
    assert score.shape == (8,)
    score.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_scale_conventions(micro, real_digits):
    x, y = real_digits
    prompts = [digit_prompts()[(int(c) + i) % 10] for i, c in enumerate(y[:20])]  # some mismatched: cos < 0 too
    with torch.no_grad():
        cos = micro.score(x[:20], prompts, scale="cos")
        torch.testing.assert_close(micro.score(x[:20], prompts, scale="100cos"), 100.0 * cos)
        torch.testing.assert_close(micro.score(x[:20], prompts, scale="hessel"), 2.5 * cos.clamp_min(0.0))
    assert cos.abs().max() <= 1.0 + 1e-5
    with pytest.raises(FewstepError, match="100cos"):
        apply_scale(cos, "percent")
    prefixed = load_micro_clip(prompt_prefix="A photo depicts ")
    assert prefixed.describe()["prompt_prefix"] == "A photo depicts "


def test_digits_reward_ranks_prompted_class(real_digits):
    x, y = real_digits
    idx = torch.arange(0, 1797, 4)
    reward = rewards.build_reward("digits-class")
    assert isinstance(reward, rewards.RewardFn) and reward.differentiable
    with torch.no_grad():
        table = torch.stack([reward(x[idx], [digit_prompts()[d]] * len(idx)) for d in range(10)], dim=1)
    assert (table.argmax(dim=1) == y[idx]).float().mean() > 0.9
    images = x[:6].clone().requires_grad_(True)
    reward(images, [digit_prompts()[int(c)] for c in y[:6]]).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="handwritten digit"):
        reward(x[:1], ["a cat"])


def test_micro_clip_reward(real_digits):
    x, y = real_digits
    reward = rewards.build_reward("micro-clip")
    out = reward(x[:5], [digit_prompts()[int(c)] for c in y[:5]])
    assert out.shape == (5,) and torch.isfinite(out).all()
    assert reward.describe()["name"] == "micro-clip" and reward.describe()["scale"] == "100cos"


def _patch_arch(monkeypatch, name, **extra):
    """Point a built-in open_clip architecture name at the tiny config (only for this test)."""
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, name, {**json.loads(json.dumps(TINY_OPEN_CLIP)), **extra})


def test_hps_adapter_loads_state_dict_checkpoint(tmp_path, monkeypatch):
    import open_clip

    _patch_arch(monkeypatch, "ViT-H-14")
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-H-14").eval()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": ref.state_dict()}, ckpt)  # the layout of the released HPS checkpoints
    hps = rewards.build_reward("hpsv2.1", checkpoint=ckpt)
    images, prompts = _images(3, 40), ["a cat", "a dog", "a handwritten digit 3"]
    out = hps(images, prompts)
    assert out.shape == (3,) and torch.isfinite(out).all()
    with torch.no_grad():  # cos of the source model's embeddings: the file's weights were really loaded
        tok = open_clip.get_tokenizer("ViT-H-14")(prompts)
        img = ref.encode_image(hps.clip.preprocess(images), normalize=True)
        expected = (img * ref.encode_text(tok, normalize=True)).sum(-1)
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
    d = hps.describe()
    assert d["name"] == "hpsv2.1" and d["model"] == "ViT-H-14" and len(d["weights_sha256"]) == 64
    images.requires_grad_(True)
    hps(images, prompts).sum().backward()
    assert torch.isfinite(images.grad).all()


def test_aesthetic_adapter_loads_published_key_layout(tmp_path, monkeypatch):
    import open_clip
    from torch import nn

    _patch_arch(monkeypatch, "ViT-L-14-quickgelu", quick_gelu=True)
    torch.manual_seed(1)
    clip_file = tmp_path / "ViT-L-14.pt"
    torch.save(open_clip.create_model("ViT-L-14-quickgelu").state_dict(), clip_file)
    published = nn.Module()  # layout of the released MLP: Linear/Dropout alternating inside `layers`
    published.layers = nn.Sequential(nn.Linear(16, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                      nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    mlp_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(published.state_dict(), mlp_file)
    reward = rewards.build_reward("aesthetic", mlp_path=mlp_file, clip_checkpoint=clip_file)
    images = _images(2, 32).requires_grad_(True)
    out = reward(images, ["x", "y"])
    assert out.shape == (2,) and torch.isfinite(out).all()
    emb = reward.clip.encode_images(images.detach())
    torch.testing.assert_close(out.detach(), published.layers.eval()(emb).squeeze(-1).detach())
    out.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert reward.describe()["clip_model"] == "ViT-L-14-quickgelu"


def test_pickscore_adapter_loads_tiny_transformers_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from fewstep.models.toy_tokenizer import build_tokenizer

    text = dict(vocab_size=56, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(2)
    folder = tmp_path / "PickScore_v1"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    reward = rewards.build_reward("pickscore", model_dir=folder)
    images = _images(3, 48).requires_grad_(True)
    out = reward(images, ["a handwritten digit 1", "a handwritten digit 2", "a handwritten digit 3"])
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert out.abs().max() <= reward.model.logit_scale.exp() + 1e-4
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert reward.describe()["name"] == "pickscore" and len(reward.describe()["weights_sha256"]) == 64


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(FewstepError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        rewards.build_reward("hpsv2.1", checkpoint=tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(FewstepError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        rewards.build_reward("aesthetic", mlp_path=tmp_path / "aes.pth", clip_checkpoint=tmp_path / "l14.pt")
    with pytest.raises(FewstepError, match=r"PickScore_v1"):
        rewards.build_reward("pickscore", model_dir=tmp_path / "nope")
    with pytest.raises(FewstepError, match=r"micro\.safetensors"):
        load_micro_clip(tmp_path / "micro.safetensors")
    with pytest.raises(FewstepError, match=r"digits classifier weights file not found: .*w\.safetensors"):
        rewards.DigitsClassReward(tmp_path / "w.safetensors")


def test_clip_loading_errors_are_one_line(tmp_path):
    with pytest.raises(FewstepError, match="unknown open_clip model 'ViT-Z-99'"):
        ClipScorer.from_pretrained("ViT-Z-99", "openai")
    with pytest.raises(FewstepError, match="neither an existing file nor an open_clip tag"):
        load_open_clip("ViT-B-32", tmp_path / "missing.pt")
    # HF_HUB_OFFLINE=1 (conftest): an uncached tag fails fast and asks for a local file
    with pytest.raises(FewstepError, match="local file") as err:
        ClipScorer.dmd2_protocol(cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, bad)
    with pytest.raises(FewstepError, match="cannot load"):
        load_open_clip(DEFAULT_CONFIG, bad)


def test_unknown_reward_lists_valid_names():
    with pytest.raises(FewstepError) as err:
        rewards.build_reward("imagereward")
    for name in ("hpsv2.1", "pickscore", "aesthetic", "digits-class", "micro-clip"):
        assert name in str(err.value)
