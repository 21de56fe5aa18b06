"""CropToCarrierd: one detection, the same crop for every key, metadata, and the inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from preprocessing.carrier import CropToCarrierD, CropToCarrierd, CropToCarrierDict
from preprocessing.segmentation import SegmentBodyPartd
from tests.preprocessing.test_carrier import CARRIER_CASES, NO_CARRIER_CASES, normalize, phantom


def _data(case, seed):
    ph = phantom(case, seed)
    x = torch.from_numpy(normalize(ph.display()))[None]
    truth = torch.from_numpy(ph.body_mask.astype(np.uint8))[None]
    return ph, {"image": MetaTensor(x.clone()), "label": MetaTensor(truth.clone()), "id": "ph"}


def test_same_crop_for_all_keys_and_metadata():
    ph, d = _data(CARRIER_CASES[2], 102)
    out = CropToCarrierd(keys=("image", "label"))(d)
    y0, y1, x0, x1 = out["image"].meta["carrier_box"]
    assert out["image"].meta["carrier_found"] is True
    assert out["label"].meta["carrier_box"] == [y0, y1, x0, x1]
    assert tuple(out["image"].shape) == tuple(out["label"].shape) == (1, y1 - y0, x1 - x0)
    assert torch.equal(out["label"].as_tensor(), d["label"].as_tensor()[:, y0:y1, x0:x1])
    assert int(out["label"].sum()) == int(ph.body_mask.sum())  # the whole body part is kept
    assert out["id"] == "ph"


def test_inverse_restores_the_grid():
    _, d = _data(CARRIER_CASES[14], 114)
    t = CropToCarrierd(keys=("image", "label"))
    out = t(d)
    back = t.inverse(out)
    y0, y1, x0, x1 = out["image"].meta["carrier_box"]
    for key in ("image", "label"):
        assert tuple(back[key].shape) == tuple(d[key].shape)
        assert torch.equal(back[key].as_tensor()[:, y0:y1, x0:x1], d[key].as_tensor()[:, y0:y1, x0:x1])
        assert not back[key].applied_operations


def test_mask_added_later_is_inverted_too():
    """In a pipeline the mask appears after the crop; listing it (allow_missing_keys) maps it back."""
    _, d = _data(CARRIER_CASES[0], 100)
    pipe = Compose([CropToCarrierd(keys=("image", "mask"), allow_missing_keys=True),
                    SegmentBodyPartd(keys="image", mask_key="mask")])
    out = pipe({"image": d["image"]})
    out["mask"] = MetaTensor(out["mask"].as_tensor().to(torch.uint8), meta=dict(out["image"].meta),
                             applied_operations=list(out["image"].applied_operations))
    back = pipe.transforms[0].inverse(out)
    assert tuple(back["mask"].shape) == tuple(d["image"].shape)
    assert int(back["mask"].sum()) == int(out["mask"].sum())


def test_no_carrier_identity_and_source_key():
    _, d = _data(NO_CARRIER_CASES[2], 202)
    out = CropToCarrierd(keys=("image", "label"), source_key="image")(d)
    assert out["image"].meta["carrier_found"] is False
    assert tuple(out["image"].shape) == tuple(d["image"].shape)


def test_missing_keys():
    _, d = _data(NO_CARRIER_CASES[0], 200)
    with pytest.raises(KeyError):
        CropToCarrierd(keys=("image", "mask"))(d)
    with pytest.raises(KeyError, match="source key"):
        CropToCarrierd(keys="image", source_key="other")(d)
    assert CropToCarrierd(keys="absent", allow_missing_keys=True)(d)["image"] is d["image"]


def test_aliases():
    assert CropToCarrierD is CropToCarrierd and CropToCarrierDict is CropToCarrierd
