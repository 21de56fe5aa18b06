"""``salad-med score`` study triage (studies.csv, study SRs) and ``salad-med evaluate`` study-level AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.dicom.study import read_study_sr
from salad_med.synthetic.phantom import write_mura_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def mura(tmp_path_factory):
    """A MURA-v1.1-like PNG tree: studies of 1-3 views in study folders."""
    root = tmp_path_factory.mktemp("mura")
    truth = write_mura_tree(root, n_patients=5, seed=4, size=(96, 80), images_per_study=(1, 3))
    return root, truth


def test_mura_tree_is_ranked_by_study_folder(tiny_dicom_run, mura, tmp_path):
    root, truth = mura
    result = runner.invoke(app, ["score", str(root / "MURA-v1.1"), "--run", str(tiny_dicom_run.run_dir),
                                 "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    studies = pd.read_csv(tmp_path / "studies.csv", keep_default_na=False)
    folders = {str(Path(p).parent) for p in scores.source_path}
    assert set(studies.study) == folders and len(studies) == len(folders)
    assert studies.n_images.sum() == len(truth) == len(scores)
    expected = scores.groupby("study").raw_score.max().sort_values(ascending=False)
    assert studies.study.tolist() == expected.index.tolist()  # most abnormal study first
    assert studies.raw_score.tolist() == pytest.approx(expected.tolist())
    assert studies["rank"].tolist() == sorted(studies["rank"].tolist())
    assert (studies.study_instance_uid == "").all() and (studies.sr_path == "").all()  # PNGs: no study SR
    assert f"{len(folders)} studies ranked by max image score" in result.output
    mean = runner.invoke(app, ["score", str(root / "MURA-v1.1"), "--run", str(tiny_dicom_run.run_dir), "-o",
                               str(tmp_path / "mean"), "--study-score", "mean", "--top", "0"])
    assert mean.exit_code == 0, mean.output
    by_mean = pd.read_csv(tmp_path / "mean" / "studies.csv", keep_default_na=False).set_index("study")
    assert (by_mean["aggregate"] == "mean").all()
    for study, g in scores.groupby("study"):
        assert by_mean.loc[study, "raw_score"] == pytest.approx(g.raw_score.mean())
        assert by_mean.loc[study, "score"] == pytest.approx(g.score.mean())
    bad = runner.invoke(app, ["score", str(root), "--run", str(tiny_dicom_run.run_dir), "-o", str(tmp_path / "x"),
                              "--study-score", "median"])
    assert bad.exit_code == 2 and "max or mean" in bad.output


def test_dicom_studies_get_one_study_sr_each(tiny_dicom_run, tmp_path):
    files = tiny_dicom_run.files.iloc[:6]
    result = runner.invoke(app, ["score", *files.source_path, "--run", str(tiny_dicom_run.run_dir), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv", dtype=str, keep_default_na=False)
    studies = pd.read_csv(tmp_path / "studies.csv", dtype=str, keep_default_na=False)
    assert sorted(studies.study_instance_uid) == sorted(set(files.study_instance_uid))
    for row in studies.itertuples(index=False):
        report = read_study_sr(row.sr_path)
        mine = scores[scores.study_instance_uid == row.study_instance_uid]
        assert set(report.images) == set(mine.image_id)
        assert report.raw_score == pytest.approx(mine.raw_score.astype(float).max(), rel=1e-9)
        for r in mine.itertuples(index=False):
            assert report.images[r.image_id].score == pytest.approx(float(r.score), rel=1e-9)


def test_evaluate_reports_study_level_auc_beside_image_level(tiny_dicom_run, tmp_path):
    split = pd.read_csv(tiny_dicom_run.run_dir.parent / "split.csv")
    # two views per patient share one study: the study is abnormal when its views are
    result = runner.invoke(app, ["evaluate", "--run", str(tiny_dicom_run.run_dir), "--split", "val", "-o",
                                 str(tmp_path), "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    study = metrics["study"]
    scores = pd.read_csv(tmp_path / "scores.csv")
    val = split[split.split == "val"].reset_index(drop=True)
    assert scores.image_id.tolist() == val.image_id.tolist()
    key = val.patient_id + "/" + val.body_part + "/" + val.study
    by_study = scores.assign(key=key).groupby("key").agg(label=("label", "max"), raw=("raw_score", "max"))
    assert study["n"] == len(by_study) < metrics["n"]  # fewer studies than images
    assert study["n_abnormal"] == int(by_study.label.sum())
    assert study["aggregate"] == "max" and study["images_per_study"] == pytest.approx(metrics["n"] / study["n"])
    assert study["auc"] == pytest.approx(roc_auc_score(by_study.label, by_study.raw))
    lo, hi = study["auc_ci95"]
    assert 0 <= lo <= hi <= 1
    written = pd.read_csv(tmp_path / "studies.csv")
    assert sorted(written.study) == sorted(by_study.index)
    assert np.isfinite(metrics["auc"])  # the image-level AUC stays where it was
