"""Offline digits metric (fid[digits-cnn]): shipped classifier, Frechet distance, diversity, input handling."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fewstep.metrics import digits as D


@pytest.fixture(scope="module")
def model() -> D.DigitsNet:
    return D.load_digits_classifier()


@pytest.fixture(scope="module")
def split(model):
    """Reference = one stratified half of the real digits, generated = the other half (float 8x8)."""
    x, y = D.digits_arrays()
    ref_idx, gen_idx = D.split_digits(seed=0, heldout_fraction=0.5)
    reference = D.digits_reference(model, x[ref_idx], y[ref_idx])
    return reference, x[gen_idx], y[gen_idx]


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def test_shipped_classifier_is_accurate(model):
    x, y = D.digits_arrays()
    assert D.classifier_accuracy(model, x.unsqueeze(1), y) >= 0.95
    images, labels = D.reference_digits(size=16)
    scores = D.score_digits(images, labels, model)
    assert scores.class_accuracy >= 0.95
    assert not model.training and model.num_features == 32


def test_loading_uses_safetensors_only(model, tmp_path, monkeypatch):
    from safetensors import safe_open

    with safe_open(str(D.DEFAULT_WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert f.metadata()["arch"] == "DigitsNet"
    assert D.DEFAULT_WEIGHTS.stat().st_size < 500_000

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    path = D.save_digits_classifier(model, tmp_path / "w.safetensors", {"note": "x"})
    loaded = D.load_digits_classifier(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x).detach())
    with pytest.raises(FileNotFoundError):
        D.load_digits_classifier(tmp_path / "missing.safetensors")


def test_real_reference_against_itself_is_zero():
    images, labels = D.reference_digits()
    scores = D.score_digits(images, labels)
    assert abs(scores.fid) < 0.5
    assert scores.diversity == pytest.approx(1.0, abs=1e-6)
    assert scores.n == 1797 and scores.metric_name == "fid[digits-cnn]"
    assert scores.as_dict()["fid[digits-cnn]"] == scores.fid


def test_fid_rises_monotonically_with_noise(model, split):
    reference, gx, gy = split
    fids = [D.score_digits(_noisy(gx, s), gy, model, reference).fid for s in (0.0, 0.1, 0.3)]
    assert fids[0] < 2.0, "a disjoint real split must be close to the reference"
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] > 10 * fids[0]


def test_dropping_half_the_classes(model, split):
    reference, gx, gy = split
    real = D.score_digits(gx, gy, model, reference)
    low = gy < 5
    half = D.score_digits(gx[low], gy[low], model, reference)
    assert half.fid > 10 * real.fid and half.fid > 10.0
    # Prompts 5-9 answered with digits 0-4: the dropped modes show up in class accuracy.
    prompts = torch.cat([gy[low], gy[low] + 5])
    dropped = D.score_digits(torch.cat([gx[low], gx[low]]), prompts, model, reference)
    assert real.class_accuracy > 0.95
    assert 0.4 < dropped.class_accuracy < 0.6
    assert dropped.fid > 10 * real.fid


def test_diversity_detects_mode_collapse(model, split):
    reference, gx, gy = split
    real = D.score_digits(gx, gy, model, reference)
    assert 0.85 < real.diversity < 1.15
    first = torch.tensor([int(torch.nonzero(gy == c)[0, 0]) for c in gy.tolist()])
    collapsed = D.score_digits(gx[first], gy, model, reference)
    assert collapsed.diversity < 1e-6
    assert collapsed.class_accuracy == 1.0


def test_frechet_distance_closed_form_and_library_agreement():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert D.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-6)
    b = rng.normal(size=(6, 6))
    sigma2 = b @ b.T + 0.1 * np.eye(6)
    ours = D.frechet_distance(mu1, sigma, mu2, sigma2)
    tm = float(_compute_fid(*(torch.from_numpy(v) for v in (mu1, sigma, mu2, sigma2))))
    assert ours == pytest.approx(tm, rel=1e-6)
    assert ours > float(np.sum((mu1 - mu2) ** 2)) + 1e-3


def test_frechet_distance_falls_back_when_scipy_drops_disp(monkeypatch):
    import cleanfid.fid

    def scipy_118(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 5, 5))
    args = (rng.normal(size=5), a @ a.T + np.eye(5), rng.normal(size=5), b @ b.T + np.eye(5))
    expected = D.frechet_distance(*args)
    monkeypatch.setattr(cleanfid.fid, "frechet_distance", scipy_118)
    assert D.frechet_distance(*args) == pytest.approx(expected, rel=1e-6)


def test_torchmetrics_fid_with_digits_extractor_agrees(model, split):
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = D.digits_arrays()
    ref_idx, _ = D.split_digits(seed=0, heldout_fraction=0.5)
    reference, gx, gy = split
    noisy = _noisy(gx, 0.1)
    metric = FrechetInceptionDistance(feature=D.DigitsFeatureExtractor(model), normalize=True)
    metric.update(x[ref_idx], real=True)
    metric.update(noisy, real=False)
    assert float(metric.compute()) == pytest.approx(D.score_digits(noisy, gy, model, reference).fid, rel=1e-3)


def test_to_digits_input_layouts():
    x8, _ = D.digits_arrays()
    x8 = x8[:7]
    u8 = torch.round(x8 * 255).to(torch.uint8)
    up = u8.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest 16x16
    hwc = up[..., None].expand(-1, -1, -1, 3).numpy().copy()  # PNG-like uint8 HWC RGB
    expected = D.to_digits_input(u8)
    assert expected.shape == (7, 1, 8, 8) and expected.dtype == torch.float32
    for variant in (up, hwc, torch.from_numpy(hwc).permute(0, 3, 1, 2), list(hwc), up.numpy()):
        assert torch.equal(D.to_digits_input(variant), expected)
    floats = D.to_digits_input(x8)
    assert torch.equal(D.to_digits_input(x8.repeat_interleave(2, 1).repeat_interleave(2, 2)), floats)
    assert torch.allclose(floats, expected, atol=0.5 / 255 + 1e-6)
    rgb = torch.stack([up, torch.zeros_like(up), torch.zeros_like(up)], dim=1)
    assert torch.allclose(D.to_digits_input(rgb), expected / 3)
    with pytest.raises(ValueError):
        D.to_digits_input(torch.zeros(2, 5, 16, 16))
    with pytest.raises(ValueError):
        D.to_digits_input(torch.zeros(2, 4, 4))


def test_training_is_seeded_and_learns():
    m1, acc1 = D.train_digits_classifier(seed=3, steps=60)
    m2, acc2 = D.train_digits_classifier(seed=3, steps=60)
    assert acc1 == acc2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert acc1 > 0.6


def test_shipped_mlp_is_a_second_accurate_independent_classifier(model):
    from safetensors import safe_open

    mlp = D.default_mlp()
    assert isinstance(mlp, D.DigitsMLP) and not mlp.training and mlp.num_features == 64
    assert D.MLP_WEIGHTS.stat().st_size < 200_000
    with safe_open(str(D.MLP_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "DigitsMLP" and meta["metric"] == "fid[digits-mlp]"
    assert meta["split"] == "split_digits(seed=1, heldout_fraction=0.2)" and meta["seed"] == str(D.MLP_SEED)
    x, y = D.digits_arrays()
    _, held = D.split_digits(seed=D.MLP_SEED, heldout_fraction=0.2)
    assert D.classifier_accuracy(mlp, x[held].unsqueeze(1), y[held]) >= 0.95
    assert float(meta["heldout_accuracy"]) == pytest.approx(D.classifier_accuracy(mlp, x[held].unsqueeze(1), y[held]),
                                                            abs=6e-5)
    _, cnn_held = D.split_digits(seed=D.CNN_SEED, heldout_fraction=0.2)
    assert not torch.equal(held, cnn_held)   # trained and validated on another split than the CNN
    images, _ = D.reference_digits(size=16)
    f1, logits = D.digits_features(mlp, images[:50])
    f2, _ = D.digits_features(mlp, images[:50])
    assert f1.shape == (50, 64) and logits.shape == (50, 10) and torch.equal(f1, f2)   # deterministic
    assert abs(D.digits_mlp_fid(images)) < 0.5   # the real digits against themselves
    noised = D.with_noise(D.digits_arrays()[0], 0.3)
    assert D.digits_mlp_fid(noised) > 10 * max(D.digits_mlp_fid(images), 0.05)
    shifted = torch.roll(D.digits_arrays()[0], shifts=2, dims=2)
    assert D.digits_mlp_fid(shifted) > 10 * max(D.digits_mlp_fid(images), 0.05)


def test_mlp_training_is_seeded(tmp_path):
    m1, acc1 = D.train_digits_classifier(seed=3, steps=60, arch="mlp")
    m2, acc2 = D.train_digits_classifier(seed=3, steps=60, arch="mlp")
    assert isinstance(m1, D.DigitsMLP) and acc1 == acc2 and acc1 > 0.5
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    loaded = D.load_digits_classifier(D.save_digits_classifier(m1, tmp_path / "m.safetensors"))
    assert isinstance(loaded, D.DigitsMLP)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), m1(x).detach())
    with pytest.raises(ValueError, match="unknown digits classifier arch"):
        D.train_digits_classifier(steps=1, arch="vit")


def test_sanity_table_rows(model):
    rows = D.digits_sanity_table(seed=0, model=model)
    by_name = {r["set"]: r for r in rows}
    assert by_name["noise sigma=0.6"]["fid[digits-cnn]"] > by_name["noise sigma=0.3"]["fid[digits-cnn]"]
    assert by_name["one image per class"]["diversity"] < 1e-6
