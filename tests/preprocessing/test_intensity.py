"""NormalizeRadiograph (percentile window -> [0, 1]) and FixPolarity (bright-background negatives)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from preprocessing.intensity import FixPolarity, NormalizeRadiograph, background_is_bright, robust_percentiles
from salad_med.synthetic.phantom import write_mura_tree

TYPES = (np.asarray, torch.as_tensor, MetaTensor)


def _radiograph(h: int = 80, w: int = 64) -> np.ndarray:
    """(1, H, W) uint8: dark background 20, soft tissue 120, a bright bone 220 in the middle."""
    img = np.full((h, w), 20, np.uint8)
    img[10:70, 16:48] = 120
    img[12:68, 28:36] = 220
    return img[None]


@pytest.mark.parametrize("as_type", TYPES)
def test_normalize_hand_computed(as_type):
    x = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    out = NormalizeRadiograph(lower=1, upper=99)(as_type(x))
    assert type(out) is type(as_type(x)) and out.dtype in (np.float32, torch.float32)
    # numpy linear percentiles of 0..99: 1 % -> 0.99, 99 % -> 98.01
    expected = np.clip((x - 0.99) / (98.01 - 0.99), 0, 1)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)
    if isinstance(out, MetaTensor):
        assert out.meta["norm_low"] == pytest.approx(0.99) and out.meta["norm_high"] == pytest.approx(98.01)
        assert out.meta["constant_image"] is False


def test_normalize_without_clip_and_full_range():
    x = np.array([[[0.0, 5.0, 10.0, 20.0]]], np.float32)
    out = NormalizeRadiograph(lower=0, upper=50, clip=False)(x)
    np.testing.assert_allclose(out, [[[0.0, 0.66666667, 1.33333333, 2.66666667]]], rtol=1e-6)  # p50 = 7.5


def test_normalize_constant_image_is_zero_and_flagged():
    out = NormalizeRadiograph()(MetaTensor(torch.full((1, 8, 8), 7.0)))
    assert torch.count_nonzero(out) == 0 and out.meta["constant_image"] is True


def test_normalize_rejects_bad_window():
    with pytest.raises(ValueError, match="lower < upper"):
        NormalizeRadiograph(lower=99, upper=1)


def test_robust_percentiles_subsample_close_to_exact():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 50.0, size=(1, 900, 700)).astype(np.float32)
    exact = np.percentile(x, [1, 99])
    approx = robust_percentiles(x, (1, 99), max_samples=100_000)
    np.testing.assert_allclose(approx, exact, rtol=0.02)
    assert robust_percentiles(x[:, :10, :10], (1, 99), max_samples=1000) == tuple(np.percentile(x[:, :10, :10], [1, 99]))


@pytest.mark.parametrize("as_type", TYPES)
def test_polarity_negative_is_inverted_back(as_type):
    img = _radiograph()
    fixer = FixPolarity()
    kept = fixer(as_type(img))
    np.testing.assert_array_equal(np.asarray(kept), img)
    fixed = fixer(as_type(255 - img))
    assert type(fixed) is type(as_type(img)) and np.asarray(fixed).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(fixed), img)
    if isinstance(fixed, MetaTensor):
        assert fixed.meta["inverted"] is True and kept.meta["inverted"] is False


def test_polarity_float_and_uint16_inversion():
    img = _radiograph().astype(np.uint16) * 200
    np.testing.assert_array_equal(FixPolarity()(65535 - img), img)
    f = _radiograph().astype(np.float32) / 255
    np.testing.assert_allclose(FixPolarity()(f.max() + f.min() - f), f, atol=1e-6)


def test_polarity_skips_dicom():
    neg = MetaTensor(torch.as_tensor(255 - _radiograph()), meta={"source_format": "dicom"})
    out = FixPolarity()(neg)
    assert torch.equal(out.as_tensor(), neg.as_tensor()) and out.meta["inverted"] is False
    assert FixPolarity(skip_dicom=False)(neg).meta["inverted"] is True


def test_polarity_on_phantom_tree(tmp_path):
    truth = write_mura_tree(tmp_path, n_patients=16, seed=1, size=(96, 80), inverted_fraction=0.4)
    pred = np.array([background_is_bright(np.asarray(Image.open(p))) for p in truth["source_path"]])
    inverted = (truth["photometric"] == "MONOCHROME1").to_numpy()
    assert inverted.sum() >= 5
    assert not (pred & ~inverted).any(), "a correctly oriented phantom was flagged as a negative"
    assert (pred & inverted).sum() >= 0.8 * inverted.sum()


def test_polarity_on_real_fracatlas(msk_sample):
    labels = pd.read_csv(msk_sample / "labels.csv")
    false_flips, found = 0, 0
    for path in labels["path"]:
        im = Image.open(msk_sample / path)
        im.draft("L", (600, 600))  # DCT-domain downscale: fast, same polarity
        a = np.asarray(im.convert("L"))[None]
        false_flips += background_is_bright(a)
        found += background_is_bright(255 - a)
    assert false_flips == 0
    assert found >= 0.95 * len(labels)  # measured: 288 / 300 negatives detected
