"""SegmentBodyPartd: the mask key, apply_mask, mask_fraction, and use of the carrier metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import preprocessing.segmentation as seg
from preprocessing.carrier import CropToCarrierd, polygon_mask
from preprocessing.segmentation import SegmentBodyPartD, SegmentBodyPartd, SegmentBodyPartDict
from tests.preprocessing.test_carrier import CARRIER_CASES, NO_CARRIER_CASES, normalize, phantom


def _image(case, seed):
    ph = phantom(case, seed)
    return ph, MetaTensor(torch.from_numpy(normalize(ph.display()))[None])


def test_mask_key_and_fraction():
    ph, img = _image(NO_CARRIER_CASES[4], 204)
    out = SegmentBodyPartd(keys="image")({"image": img})
    mask = out["mask"]
    assert tuple(mask.shape) == tuple(img.shape) and mask.dtype == torch.bool
    assert out["image"].meta["mask_fraction"] == pytest.approx(float(mask.float().mean()))
    dice = 2 * (mask[0].numpy() & ph.body_mask).sum() / (mask[0].numpy().sum() + ph.body_mask.sum())
    assert dice >= 0.9
    assert torch.equal(out["image"].as_tensor(), img.as_tensor())  # image untouched by default


def test_apply_mask_multiplies():
    _, img = _image(NO_CARRIER_CASES[5], 205)
    out = SegmentBodyPartd(keys="image", mask_key="body", apply_mask=True)({"image": img.clone()})
    m = out["body"].as_tensor()
    assert torch.equal(out["image"].as_tensor(), img.as_tensor() * m)
    assert float(out["image"][~m].abs().max()) == 0.0


def test_uses_the_carrier_polygon_after_cropping(monkeypatch):
    """After CropToCarrierd the carrier is not searched again and its exterior stays background."""
    _, img = _image(CARRIER_CASES[13], 113)  # dark carrier rotated 15 degrees: corner triangles in the box
    d = CropToCarrierd(keys="image")({"image": img})
    calls = []
    monkeypatch.setattr(seg, "detect_carrier", lambda *a, **k: calls.append(1))
    out = SegmentBodyPartd(keys="image")(d)
    assert not calls
    inside = polygon_mask(d["image"].shape[1:], np.asarray(d["image"].meta["carrier_polygon"]))
    assert out["mask"][0].numpy().any() and not (out["mask"][0].numpy() & ~inside).any()


def test_no_carrier_metadata_means_no_search(monkeypatch):
    _, img = _image(NO_CARRIER_CASES[6], 206)
    img.meta["carrier_found"] = False
    calls = []
    monkeypatch.setattr(seg, "detect_carrier", lambda *a, **k: calls.append(1))
    SegmentBodyPartd(keys="image")({"image": img})
    assert not calls


def test_failure_propagates():
    with pytest.raises(ValueError, match="no body part found"):
        SegmentBodyPartd(keys="image")({"image": MetaTensor(torch.zeros(1, 64, 64))})


def test_aliases():
    assert SegmentBodyPartD is SegmentBodyPartd and SegmentBodyPartDict is SegmentBodyPartd
