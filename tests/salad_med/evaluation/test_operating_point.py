"""Youden's J threshold, confusion counts and the bootstrap bands of the ROC/PR curves."""

from __future__ import annotations

import numpy as np
import pytest

from salad_med.evaluation.metrics import confusion_at, pr_band, roc_band, youden_threshold


def test_youden_by_hand():
    # cut-offs: 0.8 -> tpr 1/2, fpr 0 (J 0.5); 0.35 -> tpr 1, fpr 1/2 (J 0.5): the tie goes to the higher one
    t = youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (t.threshold, t.tpr, t.fpr, t.j, t.n, t.n_abnormal) == (0.8, 0.5, 0.0, 0.5, 4, 2)
    # 0.5 separates perfectly: J = 1
    t = youden_threshold([0, 0, 1, 1, 0], [0.1, 0.2, 0.5, 0.9, 0.45])
    assert t.threshold == 0.5 and t.j == 1.0
    with pytest.raises(ValueError, match="both"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_confusion_at():
    c = confusion_at([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.35)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 0, "sensitivity": 1.0, "specificity": 0.5}


def test_bands():
    y = np.r_[np.zeros(40, int), np.ones(10, int)]
    separated = y + np.linspace(0, 0.5, 50)
    xs, lo, hi = roc_band(y, separated, n_boot=50)
    assert xs.shape == lo.shape == hi.shape == (101,)
    assert (lo[1:] == 1.0).all() and (hi == 1.0).all()  # every replicate separates perfectly
    rng = np.random.default_rng(0)
    noisy = y + rng.normal(size=50)
    xs, lo, hi = roc_band(y, noisy, n_boot=100)
    assert (lo <= hi).all() and (np.diff(lo) >= -1e-12).all() and (hi - lo).max() > 0.2
    rs, plo, phi = pr_band(y, noisy, n_boot=100)
    assert (plo <= phi).all() and plo.min() >= 0 and phi.max() <= 1
    assert np.all(np.diff(phi) <= 1e-12)  # interpolated precision never rises with recall
