"""AUC / AUPRC against known values and the stratified bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from salad_med.evaluation.metrics import _rank_auc, _sorted_ap, auc, auprc, bootstrap_ci

Y = [0, 0, 1, 1]
S = [0.1, 0.4, 0.35, 0.8]


def test_auc_and_auprc_by_hand():
    # pairs (pos, neg): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok -> 3/4
    assert auc(Y, S) == pytest.approx(0.75)
    # ranking 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333
    assert auprc(Y, S) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0 / 3.0)
    # ties count 1/2: pos 0.5 vs neg 0.5 -> AUC 0.5
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0


def test_metric_input_errors():
    with pytest.raises(ValueError, match="both"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        auc([0, 1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="length"):
        auprc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])


def test_bootstrap_perfect_and_deterministic():
    y = np.array([0] * 20 + [1] * 10)
    s_perfect = np.concatenate([np.linspace(0, 0.4, 20), np.linspace(0.6, 1, 10)])
    assert bootstrap_ci(y, s_perfect, "auc", n_boot=50, seed=0) == (1.0, 1.0)
    rng = np.random.default_rng(1)
    s = y * 0.5 + rng.normal(size=y.size)
    a = bootstrap_ci(y, s, "auc", n_boot=200, seed=3)
    assert a == bootstrap_ci(y, s, auc, n_boot=200, seed=3)  # name or callable, same seed -> same CI
    assert a == bootstrap_ci(y, s, "auc", n=200, seed=3)  # ``n`` alias of n_boot
    assert a != bootstrap_ci(y, s, "auc", n_boot=200, seed=4)
    lo, hi = a
    assert 0.0 <= lo < auc(y, s) < hi <= 1.0
    lo90, hi90 = bootstrap_ci(y, s, "auc", n_boot=200, seed=3, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi  # a 90 % interval sits inside the 95 % one (same replicates)
    lo_p, hi_p = bootstrap_ci(y, s, "auprc", n_boot=100, seed=0)
    assert lo_p < auprc(y, s) < hi_p


def test_bootstrap_is_stratified_and_skips_failures():
    y = np.array([0] * 7 + [1] * 3)
    s = np.arange(10, dtype=float)
    seen = []

    def counts(yb, sb):
        seen.append((int((yb == 0).sum()), int((yb == 1).sum())))
        if len(seen) % 2:
            msg = "degenerate"
            raise ValueError(msg)  # every other replicate fails and is skipped
        return float(np.mean(sb))

    lo, hi = bootstrap_ci(y, s, counts, n_boot=20, seed=0)
    assert set(seen) == {(7, 3)} and len(seen) == 20  # class counts preserved in every replicate
    assert lo <= hi
    with pytest.raises(ValueError, match="no valid"):
        bootstrap_ci(y, s, lambda yb, sb: float("nan"), n_boot=5)
    with pytest.raises(ValueError, match="metric"):
        bootstrap_ci(y, s, "f1")
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(y, s, "auc", n_boot=0)


def test_fast_bootstrap_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=n), 1 if trial % 2 else 6)  # with and without ties
        assert _rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert _sorted_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
