"""The preprocessing benchmark's budget line: how much faster carrier detection + segmentation must run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.preprocess import budget


def _steps(group: str, per_file: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = []
    for f, (carrier, segment) in per_file.items():
        rows += [{"group": group, "file": f, "step": "LoadRadiographd", "ms": 33.0},  # not analysis: ignored
                 {"group": group, "file": f, "step": "CropToCarrierd", "ms": carrier},
                 {"group": group, "file": f, "step": "SegmentBodyPartd", "ms": segment}]
    return pd.DataFrame(rows)


def test_speedup_is_what_brings_the_median_per_image_ratio_to_the_target():
    ratios = pd.DataFrame({"group": ["jpeg"] * 3 + ["dicom"], "file": ["a", "b", "c", "d"],
                           "floor_ms": [40.0, 42.0, 44.0, 100.0], "pre_ms": [120.0, 125.0, 130.0, 140.0]})
    steps = pd.concat([_steps("jpeg", {"a": (20.0, 50.0), "b": (22.0, 52.0), "c": (21.0, 51.0)}),
                       _steps("dicom", {"d": (10.0, 20.0)})])
    jpeg, dicom = (budget(ratios, steps).set_index("group").loc[g] for g in ("jpeg", "dicom"))
    # jpeg: analysis 70 / 74 / 72, rest 50 / 51 / 58; image i meets 1.5x once its analysis fits in
    # 1.5 floor_i - rest_i = 10 / 12 / 8 ms, i.e. 7.0 / 6.17 / 9.0x faster: the median image needs 7.0x
    assert jpeg["analysis_ms"] == pytest.approx(72.0) and jpeg["rest_ratio"] == pytest.approx(50.0 / 40.0)
    assert jpeg["speedup"] == pytest.approx(7.0, rel=1e-6)
    assert jpeg["budget_ms"] == pytest.approx(72.0 / 7.0, rel=1e-6)
    # dicom: analysis 30, rest 110; 150 - 110 = 40 ms: the analysis already fits (0.75x its speed would do)
    assert dicom["speedup"] == pytest.approx(0.75, rel=1e-6) and dicom["budget_ms"] == pytest.approx(40.0, rel=1e-6)


def test_speedup_with_an_even_number_of_images_meets_the_mean_of_the_middle_two():
    ratios = pd.DataFrame({"group": ["g"] * 2, "file": ["a", "b"], "floor_ms": [10.0, 20.0], "pre_ms": [30.0, 45.0]})
    s = budget(ratios, _steps("g", {"a": (10.0, 15.0), "b": (10.0, 10.0)})).iloc[0]["speedup"]
    # rest 5 / 25; median ratio at s = ((5 + 25 / s) / 10 + (25 + 20 / s) / 20) / 2 = 0.875 + 1.75 / s = 1.5
    assert s == pytest.approx(2.8, rel=1e-6)
    assert np.median([(5 + 25 / s) / 10, (25 + 20 / s) / 20]) == pytest.approx(1.5)


def test_budget_when_the_rest_alone_misses_the_target():
    ratios = pd.DataFrame({"group": ["slow"], "file": ["a"], "floor_ms": [10.0], "pre_ms": [40.0]})
    row = budget(ratios, _steps("slow", {"a": (2.0, 3.0)})).iloc[0]
    assert math.isinf(row["speedup"]) and row["budget_ms"] == 0.0  # the rest is 35 ms = 3.5x the floor
    assert row["rest_ratio"] == pytest.approx(3.5)


def test_budget_refuses_timings_without_the_analysis_steps():
    ratios = pd.DataFrame({"group": ["g"], "file": ["a"], "floor_ms": [10.0], "pre_ms": [40.0]})
    steps = pd.DataFrame({"group": ["g"], "file": ["a"], "step": ["SegmentBodyPart"], "ms": [5.0]})  # renamed
    with pytest.raises(ValueError, match="CropToCarrierd"):
        budget(ratios, steps)
    with pytest.raises(ValueError, match="'b'"):  # an image without step timings
        budget(pd.DataFrame({"group": ["g"] * 2, "file": ["a", "b"], "floor_ms": [10.0] * 2, "pre_ms": [40.0] * 2}),
               _steps("g", {"a": (1.0, 2.0)}))
