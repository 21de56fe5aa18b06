"""Score calibration (fraction of validation normals scoring lower) and the no-spread guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salad_med.errors import DegenerateScoreError
from salad_med.scoring.calibration import EmpiricalCalibration, check_spread


def test_ecdf_by_hand_with_ties():
    # validation normals 1, 2, 2, 4 -> knots 1, 2, 4 with mid-rank fractions 0.5/4, (1 + 1)/4, (3 + 0.5)/4
    cal = EmpiricalCalibration().fit([1.0, 2.0, 2.0, 4.0])
    np.testing.assert_allclose(cal.knots_, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(cal.levels_, [0.125, 0.5, 0.875])
    # below every normal: 0; above every normal: 1; between knots: linear
    np.testing.assert_allclose(cal.transform([0.0, 1.0, 1.5, 3.0, 4.0, 9.0]),
                               [0.0, 0.125, 0.3125, 0.6875, 0.875, 1.0])


def test_monotone_and_cannot_saturate_on_noise():
    # a narrow validation range (the min-max fit this replaces clipped most real images to 1.0)
    rng = np.random.default_rng(0)
    val = 0.0437 + 1e-5 * rng.standard_normal(300)
    cal = EmpiricalCalibration().fit(val)
    test = np.sort(0.0437 + 1e-5 * rng.standard_normal(50))
    out = cal.transform(test)
    assert np.all(np.diff(out) >= 0)
    assert 0.0 < np.median(out) < 1.0 and (out == 1.0).mean() < 0.1
    # two raw scores 1e-12 apart (float noise) map to scores at most slope * 1e-12 apart
    assert abs(float(cal.transform([test[25]])[0] - cal.transform([test[25] + 1e-12])[0])) < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_module_equals_transform_and_state_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    cal = EmpiricalCalibration().fit(rng.standard_normal(200))
    raw = torch.from_numpy(rng.standard_normal(64) * 1.5)
    head = torch.jit.script(cal.to_module())
    np.testing.assert_allclose(head(raw).numpy(), cal.transform(raw.numpy()), atol=1e-6)  # float32 output
    torch.save(cal.state_dict(), tmp_path / "cal.pt")
    again = EmpiricalCalibration().load_state_dict(torch.load(tmp_path / "cal.pt", weights_only=True))
    np.testing.assert_array_equal(again.transform(raw.numpy()), cal.transform(raw.numpy()))
    with pytest.raises(ValueError, match="calibration"):
        EmpiricalCalibration().load_state_dict({"kind": "minmax"})


def test_constant_scores_are_refused():
    with pytest.raises(DegenerateScoreError, match="all 5 scores are equal"):
        check_spread(np.full(5, 0.01))  # e.g. Eq. 4 with K >= N: every score 1/N
    with pytest.raises(DegenerateScoreError, match="equal"):
        check_spread(0.01 + np.array([0.0, 1e-12, 2e-12]))  # float noise is no spread
    with pytest.raises(DegenerateScoreError, match="NaN"):
        check_spread([0.1, float("nan")])
    with pytest.raises(DegenerateScoreError, match="cannot be ranked"):
        check_spread([0.1])
    with pytest.raises(DegenerateScoreError):
        EmpiricalCalibration().fit(np.full(10, 0.5))
    np.testing.assert_allclose(check_spread([0.01, 0.0100001]), [0.01, 0.0100001])
