"""Dictionary twins NormalizeRadiographd / FixPolarityd: same maths as the array transforms, per key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from preprocessing.intensity import (
    FixPolarity,
    FixPolarityD,
    FixPolarityd,
    FixPolarityDict,
    NormalizeRadiograph,
    NormalizeRadiographD,
    NormalizeRadiographd,
    NormalizeRadiographDict,
)


def _negative() -> np.ndarray:
    img = np.full((1, 60, 50), 30, np.uint8)
    img[:, 10:50, 15:35] = 200
    return 255 - img


def test_aliases():
    assert NormalizeRadiographD is NormalizeRadiographDict is NormalizeRadiographd
    assert FixPolarityD is FixPolarityDict is FixPolarityd
    assert NormalizeRadiographd.backend == NormalizeRadiograph.backend
    assert FixPolarityd.backend == FixPolarity.backend


def test_normalized_matches_array_transform_per_key():
    rng = np.random.default_rng(3)
    a, b = rng.random((1, 20, 20)) * 1000, rng.random((1, 20, 20)) * 5
    d = NormalizeRadiographd(keys=("image", "other"), lower=2, upper=98)({"image": a, "other": b, "label": 1})
    np.testing.assert_allclose(d["image"], NormalizeRadiograph(2, 98)(a))
    np.testing.assert_allclose(d["other"], NormalizeRadiograph(2, 98)(b))
    assert d["label"] == 1 and d["image"].dtype == np.float32


def test_fix_polarityd_records_flag_in_meta():
    neg = MetaTensor(torch.as_tensor(_negative()), meta={"source_format": "png"})
    d = FixPolarityd(keys="image")({"image": neg})
    assert d["image"].meta["inverted"] is True
    np.testing.assert_array_equal(d["image"].numpy(), 255 - _negative())


def test_missing_keys():
    with pytest.raises(KeyError):
        NormalizeRadiographd(keys="image")({"mask": np.zeros((1, 4, 4))})
    d = FixPolarityd(keys=("image", "mask"), allow_missing_keys=True)({"image": _negative()})
    assert set(d) == {"image"}
