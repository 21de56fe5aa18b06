"""Fixtures of the evaluation tests: one evaluated tiny run (metrics, scores and report.html with maps)."""

from __future__ import annotations

import pandas as pd
import pytest


@pytest.fixture(scope="session")
def typed_split(tiny_split, tmp_path_factory):
    """:func:`tests.conftest.write_tiny_split` with an ``anomaly`` column (two types, by body part)."""
    df = pd.read_csv(tiny_split, dtype={"image_id": str})
    df["anomaly"] = [("square_hand" if bp == "XR_HAND" else "square_wrist") if lab == 1 else ""
                     for bp, lab in zip(df["body_part"], df["label"], strict=True)]
    out = tmp_path_factory.mktemp("typed_split") / "split.csv"
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="session")
def evaluated(tiny_run, typed_split, tmp_path_factory):
    """``evaluate_run`` of the tiny SALAD run on test (report with occlusion maps): (result, output folder)."""
    from salad_med.evaluation.evaluate import evaluate_run

    out = tmp_path_factory.mktemp("evaluated") / "eval-test"
    result = evaluate_run(tiny_run, "test", out, manifest=typed_split, n_boot=200)
    return result, out
