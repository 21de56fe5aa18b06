"""The preprocessing benchmark's budget line: what the 1.5x target leaves for carrier detection + segmentation."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmarks.preprocess import budget


def test_budget_is_the_target_minus_everything_but_the_analysis():
    ratios = pd.DataFrame({"group": ["jpeg"] * 3 + ["dicom"],
                           "floor_ms": [40.0, 42.0, 44.0, 100.0], "pre_ms": [120.0, 125.0, 130.0, 140.0]})
    steps = pd.DataFrame({"group": ["jpeg"] * 6 + ["dicom"] * 3,
                          "step": ["LoadRadiographd", "CropToCarrierd", "SegmentBodyPartd"] * 3,
                          "ms": [33.0, 20.0, 50.0, 34.0, 22.0, 52.0, 90.0, 10.0, 20.0]})
    jpeg, dicom = (budget(ratios, steps).set_index("group").loc[g] for g in ("jpeg", "dicom"))
    # jpeg: analysis = median 21 + median 51 = 72; rest = median 125 - 72 = 53 (1.262x the 42 ms floor);
    # the target allows 1.5 * 42 = 63, so the analysis has 63 - 53 = 10 ms: 7.2x faster than its 72 ms
    assert jpeg["analysis_ms"] == pytest.approx(72.0) and jpeg["rest_ms"] == pytest.approx(53.0)
    assert jpeg["rest_ratio"] == pytest.approx(53.0 / 42.0)
    assert jpeg["budget_ms"] == pytest.approx(10.0) and jpeg["speedup"] == pytest.approx(7.2)
    # dicom: analysis 30, rest 110 = 1.1x; 150 - 110 = 40 ms: the analysis already fits (speedup 0.75)
    assert dicom["budget_ms"] == pytest.approx(40.0) and dicom["speedup"] == pytest.approx(0.75)


def test_budget_when_the_rest_alone_misses_the_target():
    ratios = pd.DataFrame({"group": ["slow"], "floor_ms": [10.0], "pre_ms": [40.0]})
    steps = pd.DataFrame({"group": ["slow"] * 2, "step": ["CropToCarrierd", "SegmentBodyPartd"], "ms": [2.0, 3.0]})
    row = budget(ratios, steps).iloc[0]
    assert row["budget_ms"] == pytest.approx(-20.0) and math.isinf(row["speedup"])  # 15 - (40 - 5)


def test_budget_refuses_timings_without_the_analysis_steps():
    ratios = pd.DataFrame({"group": ["g"], "floor_ms": [10.0], "pre_ms": [40.0]})
    steps = pd.DataFrame({"group": ["g"], "step": ["SegmentBodyPart"], "ms": [5.0]})  # a renamed transform
    with pytest.raises(ValueError, match="CropToCarrierd"):
        budget(ratios, steps)
