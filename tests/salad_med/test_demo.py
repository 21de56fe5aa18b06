"""``salad-med demo --quick``: the offline main job end to end on phantoms (reduced size)."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from salad_med.cli.app import app

runner = CliRunner()


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--output", str(out), "--quick", "--patients", "40"])
    assert res.exit_code == 0, res.output
    assert "salad" in res.output and "dae" in res.output and "test AUC" in res.output
    report = out / "report"
    for name in ("results.csv", "summary.json", "roc.png", "pr.png", "score_histograms.png",
                 "salad/metrics.json", "salad/roc.png", "salad/curves.png", "dae/scores.csv",
                 "preprocess_preview.png", "dicom_scores.csv"):
        assert (report / name).is_file(), name
    for run in ("salad", "dae"):
        for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv", "curves.png"):
            assert (out / "runs" / run / name).is_file(), (run, name)
    results = pd.read_csv(report / "results.csv")
    assert results["method"].tolist() == ["salad", "dae"]
    assert results["auc"].between(0, 1).all() and results["auprc"].between(0, 1).all()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["split_counts"]["train"] > summary["split_counts"]["test"] > 0
    for r in summary["results"]:
        assert r["auc_ci95"][0] <= r["auc"] <= r["auc_ci95"][1]
        shown = f"{r['auc']:.3f}"
        assert shown in res.output
    # the test split of the split manifest is exactly what evaluate scored
    split = pd.read_csv(out / "split.csv", dtype={"image_id": str})
    scores = pd.read_csv(report / "salad" / "scores.csv", dtype={"image_id": str})
    assert sorted(scores["image_id"]) == sorted(split.loc[split["split"] == "test", "image_id"])
    dicom = pd.read_csv(report / "dicom_scores.csv")
    assert len(dicom) == 4 and (dicom["status"] == "ok").all() and dicom["score"].between(0, 1).all()


def test_demo_salad_separates_phantom_anomalies(tmp_path):
    """SALAD alone (Eq. 1-4, paper defaults apart from the budget) finds the phantom anomalies.

    32x32 inputs, 200 patients, 10 pre-training epochs + 2 rounds x 3, L_rec averaged over pixels: measured
    test AUC 0.82 / 0.80 / 0.78 for seeds 0 / 1 / 2 (a broken bank, loss or score direction gives ~0.5).
    At this tiny budget the paper's pixel sum has not converged yet (0.72 / 0.60 for seeds 0 / 1); at the
    demo's own budget (64x64, 30 epochs) the sum is the better one (0.904 vs 0.849, docs/accuracy.md).
    """
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--output", str(out), "--quick", "--patients", "200", "--methods", "salad",
                              "--set", "train.pretrain_epochs=10", "--set", "train.rounds=2",
                              "--set", "train.epochs_per_round=3", "--set", "train.rec_reduction=mean"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "report" / "summary.json").read_text())
    (salad,) = summary["results"]
    assert salad["method"] == "salad" and salad["n_test_abnormal"] >= 60
    assert salad["auc"] >= 0.75, salad
    assert salad["auc_ci95"][0] >= 0.65, salad
    per_kind = {r["anomaly"]: r["auc"] for r in summary["per_anomaly"]}
    assert set(per_kind) == {"fracture", "implant", "lesion"}
    assert min(per_kind.values()) >= 0.65, per_kind
