"""FID/KID layer: streaming statistics, Frechet/kernel distances, feature extractors and the reference store."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.metrics import digits as D
from fewstep.metrics import features as FX
from fewstep.metrics import fid as F


def _gaussian(n: int, d: int, seed: int, loc: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc, 2.0, size=(n, d)) @ rng.normal(size=(d, d))


@pytest.fixture(scope="module")
def digits_ext() -> FX.DigitsExtractor:
    return FX.build_extractor("digits")


# ----------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("chunks", [[500], [1, 7, 100, 392], [250, 250], [3] * 166 + [2]])
def test_streaming_mean_cov_matches_numpy(chunks):
    x = _gaussian(500, 16, seed=0)
    stats = F.FeatureStats(16)
    start = 0
    for size in chunks:
        stats.update(torch.from_numpy(x[start: start + size]))
        start += size
    mu, cov = stats.mean_cov()
    assert stats.n == 500
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=0, atol=1e-10)


def test_merge_of_halves_equals_whole_and_state_dict_round_trips():
    x = torch.from_numpy(_gaussian(300, 8, seed=1))
    whole = F.FeatureStats(8, keep=250).update(x)
    a, b = F.FeatureStats(8, keep=250).update(x[:120]), F.FeatureStats(8, keep=250).update(x[120:])
    merged = a.merge(b)
    assert merged.n == whole.n == 300
    for got, want in zip(merged.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert torch.equal(merged.features, x[:250]) and torch.equal(whole.features, x[:250])
    back = F.FeatureStats.from_state_dict(merged.state_dict())
    assert back.n == 300 and back.keep == 250 and torch.equal(back.features, merged.features)
    assert torch.equal(back.outer_sum, merged.outer_sum)


def test_gather_stats_single_process_is_identity():
    from accelerate import Accelerator

    x = torch.from_numpy(_gaussian(50, 4, seed=2))
    stats = F.FeatureStats(4, keep=10).update(x)
    gathered = F.gather_stats(stats, Accelerator(cpu=True))
    assert gathered.n == 50 and torch.equal(gathered.features, x[:10])
    for got, want in zip(gathered.mean_cov(), stats.mean_cov()):
        np.testing.assert_array_equal(got, want)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(FewstepError, match="at least 2"):
        F.FeatureStats(3).update(torch.ones(1, 3)).mean_cov()


# ----------------------------------------------------------------------------------------------- FID / KID


def test_fid_of_identical_features_is_zero():
    x = torch.from_numpy(_gaussian(400, 16, seed=3))
    assert abs(F.fid(F.FeatureStats(16).update(x), F.FeatureStats(16).update(x))) < 1e-6


def test_fid_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(4)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenbasis -> closed form in the eigenvalues
    s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert F.fid((mu1, np.diag(s1)), (mu2, np.diag(s2))) == pytest.approx(expected, rel=1e-9)
    rotated = F.fid((mu1, q @ np.diag(s1) @ q.T), (mu2, q @ np.diag(s2) @ q.T))
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_fid_refuses_different_dimensions():
    with pytest.raises(FewstepError, match="4-d with 3-d"):
        F.fid((np.zeros(4), np.eye(4)), (np.zeros(3), np.eye(3)))


def test_kid_identical_near_zero_shifted_positive_and_seeded():
    x = torch.from_numpy(_gaussian(400, 16, seed=5))
    y = torch.from_numpy(_gaussian(400, 16, seed=6))
    same_mean, _ = F.kid(x, x, subsets=20, subset_size=200, seed=0)
    shifted_mean, shifted_std = F.kid(x, y + 1.0, subsets=20, subset_size=200, seed=0)
    assert shifted_mean > 0 and shifted_mean > 5 * shifted_std
    assert abs(same_mean) < 0.02 * shifted_mean
    assert F.kid(x, y, subsets=5, subset_size=100, seed=7) == F.kid(x, y, subsets=5, subset_size=100, seed=7)
    assert F.kid(x, y, subsets=5, subset_size=100, seed=7) != F.kid(x, y, subsets=5, subset_size=100, seed=8)


def test_kid_agrees_with_clean_fid_on_full_subsets():
    from cleanfid.fid import kernel_distance

    x, y = _gaussian(60, 8, seed=8), _gaussian(60, 8, seed=9) + 0.5
    ours, std = F.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=60)
    assert ours == pytest.approx(kernel_distance(x, y, num_subsets=1, max_subset_size=60), rel=1e-9)
    assert std == 0.0


def test_kid_needs_enough_kept_features():
    stats = F.FeatureStats(4, keep=10).update(torch.randn(50, 4))
    with pytest.raises(FewstepError, match="subset_size=20"):
        F.kid(stats, stats, subsets=2, subset_size=20)
    with pytest.raises(FewstepError, match="keep=N"):
        F.kid(F.FeatureStats(4).update(torch.randn(50, 4)), stats, subset_size=5)


# ----------------------------------------------------------------------------------------------- manifests and store


def test_manifest_mismatch_is_refused_naming_the_key(digits_ext):
    m1 = F.manifest_for(digits_ext, "offline_digits", F.hash_items(["a", "b"]), n=10)
    m2 = F.manifest_for(digits_ext, "offline_digits", F.hash_items(["a", "c"]), n=20)
    with pytest.raises(FewstepError, match="'reference_sha256'"):
        F.check_compatible(m1, m2)
    F.check_compatible(m1, {**m1, "n": 999, "created": "1970-01-01"})  # only n and created may differ
    with pytest.raises(FewstepError, match="'preprocess.size'"):
        F.check_compatible(m1, {**m1, "preprocess": {**m1["preprocess"], "size": 16}})
    with pytest.raises(FewstepError, match="'versions.torch'"):
        F.check_compatible(m1, {**m1, "versions": {**m1["versions"], "torch": "0.0"}})
    assert set(m1) >= {"protocol", "extractor", "extractor_weights_sha256", "preprocess", "reference_sha256", "n",
                       "versions", "created"}
    assert m1["extractor"] == "digits-cnn" and m1["extractor_weights_sha256"] == FX.file_sha256(D.DEFAULT_WEIGHTS)


def test_hash_items_is_order_and_boundary_sensitive():
    assert F.hash_items(["a", "b"]) != F.hash_items(["b", "a"])
    assert F.hash_items(["ab", "c"]) != F.hash_items(["a", "bc"])
    assert F.hash_items(iter(["x"])) == F.hash_items(["x"])


def test_store_round_trips_atomically(tmp_path, digits_ext):
    x = torch.from_numpy(_gaussian(40, 32, seed=10))
    stats = F.FeatureStats(32, keep=15).update(x)
    manifest = F.manifest_for(digits_ext, "offline_digits", F.hash_items(["r"]))
    npz, js = F.save_reference(tmp_path / "refs" / "digits", stats, manifest)
    assert sorted(p.name for p in npz.parent.iterdir()) == ["digits.json", "digits.npz"]
    ref = F.load_reference(tmp_path / "refs" / "digits.npz")
    mu, sigma = stats.mean_cov()
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_array_equal(ref.features, x[:15].numpy())
    assert ref.n == 40 and ref.manifest == {**manifest, "n": 40}
    assert json.loads(js.read_text())["n"] == 40
    assert F.fid(ref, stats) == pytest.approx(0.0, abs=1e-6)
    assert F.fid(ref, F.load_reference(tmp_path / "refs" / "digits")) == pytest.approx(0.0, abs=1e-6)
    F.save_reference(tmp_path / "refs" / "other", stats, {**manifest, "protocol": "coco2014_30k_fid"})
    with pytest.raises(FewstepError, match="'protocol'"):
        F.fid(ref, F.load_reference(tmp_path / "refs" / "other"))


def test_failed_write_leaves_no_files(tmp_path, monkeypatch, digits_ext):
    stats = F.FeatureStats(32).update(torch.randn(5, 32))
    manifest = F.manifest_for(digits_ext, "offline_digits", "0" * 64)

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        F.save_reference(tmp_path / "ref", stats, manifest)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FewstepError, match="not found"):
        F.load_reference(tmp_path / "ref")


# ----------------------------------------------------------------------------------------------- extractors


def test_unknown_extractor_lists_valid_names():
    with pytest.raises(FewstepError, match="clip, digits, digits-mlp, inception"):
        FX.build_extractor("vgg")
    with pytest.raises(FewstepError, match="no option 'bogus'"):
        FX.build_extractor("digits", bogus=1)


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    from cleanfid.downloads_helper import inception_url

    monkeypatch.setenv(FX.INCEPTION_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FewstepError) as err:
        FX.build_extractor("inception")
    msg = str(err.value)
    assert "\n" not in msg and FX.INCEPTION_FILE in msg and FX.INCEPTION_ENV in msg and inception_url in msg
    monkeypatch.delenv(FX.INCEPTION_ENV)
    with pytest.raises(FewstepError, match=FX.INCEPTION_ENV):
        FX.InceptionExtractor()


class _Layers(nn.Module):
    """Stand-in for the Inception graph: channel means -> 2048-d (exercises the real loading and resize path)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))


class _FakeInception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_extractor_loads_local_file_and_uses_clean_resize(tmp_path, monkeypatch):
    torch.manual_seed(0)
    fake = _FakeInception()
    torch.jit.script(fake).save(str(tmp_path / FX.INCEPTION_FILE))
    monkeypatch.setenv(FX.INCEPTION_ENV, str(tmp_path))  # a folder works, as does the file itself
    ext = FX.build_extractor("inception")
    assert ext.id == "inception-v3-clean" and ext.dim == 2048 and ext.preprocess["size"] == 299
    assert ext.weights_sha256 == FX.file_sha256(tmp_path / FX.INCEPTION_FILE)
    # Constant images survive the bicubic resize; 0.5 -> uint8 128 -> (128 - 128) / 128 = 0.
    colours = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 128 / 255]], dtype=torch.float32)
    images = colours[:, :, None, None].expand(-1, -1, 24, 40)
    feats = FX.InceptionExtractor(tmp_path / FX.INCEPTION_FILE)(images)
    assert feats.dtype == torch.float64 and feats.shape == (2, 2048)
    u8 = torch.round(colours.double() * 255)
    expected = fake.layers.proj(((u8 - 128) / 128).float()).double()
    torch.testing.assert_close(feats, expected.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(FewstepError, match="rename"):
        (tmp_path / "other.pt").write_bytes(b"x")
        FX.InceptionExtractor(tmp_path / "other.pt")


def test_clip_extractor_from_local_checkpoint(tmp_path, monkeypatch):
    import open_clip
    import open_clip.factory

    # Register a tiny architecture through open_clip's own config registry; restored after the test.
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    name = "fewstep-test-tiny-clip"
    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    ext = FX.build_extractor("clip", model_name=name, pretrained=str(ckpt))
    assert ext.id == f"clip-{name}/tiny.pt" and ext.dim == 24
    assert ext.weights_sha256 == FX.file_sha256(ckpt)
    assert ext.preprocess["size"] == 32 and ext.preprocess["crop"] == "center"
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    feats = ext(images)
    assert feats.dtype == torch.float64 and feats.shape == (3, 24)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3, dtype=torch.float64))
    same = FX.ClipExtractor(name, model=model)
    torch.testing.assert_close(same(images), feats)
    assert same.weights_sha256 == FX.state_dict_sha256(model) and same.id == f"clip-{name}/in-memory"
    with pytest.raises(FewstepError, match="pretrained"):
        FX.ClipExtractor(name)
    with pytest.raises(FewstepError, match="unknown open_clip model"):
        FX.ClipExtractor("NoSuchNet", pretrained=str(ckpt))


def test_digits_fid_real_split_below_noised(digits_ext):
    x, _ = D.digits_arrays()
    ref_idx, gen_idx = D.split_digits(seed=0, heldout_fraction=0.5)
    ref = F.extract_stats(digits_ext, x[ref_idx].unsqueeze(1).split(256), keep=0)
    real = F.extract_stats(digits_ext, [x[gen_idx].unsqueeze(1)])
    noised = F.extract_stats(digits_ext, [D.with_noise(x[gen_idx], 0.3).unsqueeze(1)])
    real_fid, noised_fid = F.fid(real, ref), F.fid(noised, ref)
    assert real_fid < 5.0 < noised_fid and noised_fid > 3 * real_fid
    assert digits_ext.id == "digits-cnn" and digits_ext.dim == 32


def test_digits_mlp_extractor_is_a_separate_feature_space(digits_ext):
    mlp = FX.build_extractor("digits-mlp")
    assert mlp.id == "digits-mlp" and mlp.dim == 64 and isinstance(mlp.model, D.DigitsMLP)
    assert mlp.weights_sha256 == FX.file_sha256(D.MLP_WEIGHTS) != digits_ext.weights_sha256
    x, _ = D.digits_arrays()
    ref_idx, gen_idx = D.split_digits(seed=0, heldout_fraction=0.5)
    ref = F.extract_stats(mlp, x[ref_idx].unsqueeze(1).split(256), keep=0)
    real = F.extract_stats(mlp, [x[gen_idx].unsqueeze(1)])
    noised = F.extract_stats(mlp, [D.with_noise(x[gen_idx], 0.3).unsqueeze(1)])
    assert F.fid(real, ref) < 0.2 * F.fid(noised, ref)
    # CNN and MLP statistics of the same reference never compare: the manifests differ in id and weights hash
    m_cnn = F.manifest_for(digits_ext, "toy-digits", F.hash_items(["r"]), n=10)
    m_mlp = F.manifest_for(mlp, "toy-digits", F.hash_items(["r"]), n=10)
    assert m_mlp["extractor"] == "digits-mlp" and m_mlp["extractor_weights_sha256"] == mlp.weights_sha256
    with pytest.raises(FewstepError, match="'extractor'"):
        F.check_compatible(m_cnn, m_mlp)
    cnn_ref = F.Reference(*F.extract_stats(digits_ext, [x[ref_idx].unsqueeze(1)]).mean_cov(), n=1, features=None,
                          manifest=m_cnn)
    mlp_ref = F.Reference(*ref.mean_cov(), n=1, features=None, manifest=m_mlp)
    with pytest.raises(FewstepError):
        F.fid(cnn_ref, mlp_ref)
    with pytest.raises(FewstepError, match="needs DigitsMLP weights"):
        FX.build_extractor("digits-mlp", weights=D.DEFAULT_WEIGHTS)


def test_image_folder_stats_equals_in_memory(tmp_path, digits_ext):
    from PIL import Image

    images, _ = D.reference_digits(size=16)
    images = images[:23]
    for i, im in enumerate(images):  # written in reverse name order on purpose; reading sorts by name
        Image.fromarray(im.numpy()).convert("RGB").save(tmp_path / f"{22 - i:05d}.png")
    stats = F.image_folder_stats(tmp_path, digits_ext, batch_size=5, keep=4)
    direct = F.FeatureStats(32, keep=4).update(digits_ext(images.flip(0).unsqueeze(1)))
    assert stats.n == 23
    for got, want in zip(stats.mean_cov(), direct.mean_cov()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 CNN, other batching
    torch.testing.assert_close(stats.features, direct.features, rtol=1e-4, atol=1e-5)   # GPU kernels vary by batch
    h = F.hash_folder(tmp_path)
    assert h == F.hash_folder(tmp_path)
    (tmp_path / "00000.png").unlink()
    assert F.hash_folder(tmp_path) != h
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewstepError, match="no PNG"):
        F.image_folder_stats(tmp_path / "empty", digits_ext)
