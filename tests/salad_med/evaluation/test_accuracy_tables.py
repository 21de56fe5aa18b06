"""The accuracy benchmark's tables: test and validation AUC per method x data set, mean +- std over seeds."""

from __future__ import annotations

import pytest

from benchmarks.accuracy import markdown, summarise


def _row(method: str, seed: int, test: float, val: float, ci: tuple[float, float]) -> dict:
    return {"dataset": "zhanglab", "method": method, "seed": seed, "test_auc": test, "val_auc": val,
            "test_auc_ci95": list(ci), "cpu_s": 10.0}


def test_tables_give_mean_and_sample_std_over_seeds_for_test_and_validation():
    rows = [_row("salad", 0, 0.90, 0.93, (0.86, 0.94)), _row("salad", 1, 0.92, 0.95, (0.88, 0.96)),
            _row("dae", 0, 0.87, 0.88, (0.83, 0.91))]
    summary = summarise(rows)
    salad = summary[summary["method"] == "salad"].iloc[0]
    # two seeds: mean 0.91 / 0.94, sample std |a - b| / sqrt(2) = 0.01414 (hand-computed)
    assert salad["test_auc_mean"] == pytest.approx(0.91) and salad["val_auc_mean"] == pytest.approx(0.94)
    assert salad["test_auc_std"] == pytest.approx(0.02 / 2**0.5) and salad["val_auc_std"] == pytest.approx(0.02 / 2**0.5)
    test, val = markdown(summary).splitlines(), markdown(summary, "val").splitlines()
    assert test[2] == "| salad | 0.910 ± 0.014 (2) [0.87-0.95] |"
    assert val[2] == "| salad | 0.940 ± 0.014 (2) |"  # no bootstrap CI on the trainer's validation AUC
    assert test[3] == "| dae | 0.870 (1) [0.83-0.91] |" and val[3] == "| dae | 0.880 (1) |"  # one seed: no std
