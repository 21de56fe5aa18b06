"""Study-level triage: grouping, the study score, the ranking and the study SR (highdicom, read back)."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest

from salad_med.dicom.sr import read_score_sr, write_score_sr
from salad_med.dicom.study import (
    aggregate,
    aggregate_studies,
    build_study_sr,
    is_study_sr,
    manifest_study_keys,
    read_study_sr,
    study_keys,
    triage_studies,
    write_study_sr,
)
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool
from salad_med.errors import ConfigError, DataError
from salad_med.synthetic.phantom import write_dicom_tree

DSRDUMP = dcmtk_tool("dsrdump")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Six phantoms: three studies of two views (write_dicom_tree pairs images 2k and 2k+1)."""
    return write_dicom_tree(tmp_path_factory.mktemp("study_tree"), n=6, seed=11, size=(64, 64))


def _table() -> pd.DataFrame:
    # study A: raw 0.2, 0.9 (one failed image); study B: raw 0.5, 0.6; study C: one failed image only
    return pd.DataFrame({
        "image_id": ["a1", "a2", "a3", "b1", "b2", "c1"],
        "study": ["A", "A", "A", "B", "B", "C"],
        "score": [0.10, 0.95, np.nan, 0.40, 0.70, np.nan],
        "raw_score": [0.2, 0.9, np.nan, 0.5, 0.6, np.nan],
        "ood": [False, True, False, False, False, False],
        "status": ["ok", "ok", "failed", "ok", "ok", "failed"],
        "label": [0, 1, 1, 0, 0, 1],
    })


def test_aggregate_max_and_mean_by_hand():
    assert aggregate([0.2, 0.9, np.nan], "max") == 0.9
    assert aggregate([0.2, 0.9, np.nan], "mean") == pytest.approx(0.55)
    assert np.isnan(aggregate([np.nan], "max"))
    with pytest.raises(ConfigError, match="median"):
        aggregate([1.0], "median")


def test_aggregate_studies_max_ranks_the_worst_view_first():
    out = aggregate_studies(_table(), "max")
    assert out["study"].tolist() == ["A", "B", "C"]  # A's worst view (0.9) beats B's (0.6); C unscored last
    a, b, c = (out.set_index("study").loc[k] for k in "ABC")
    assert (a["rank"], a["score"], a["raw_score"], a["n_images"], a["n_scored"], a["n_failed"], a["n_ood"]) == \
        (1, 0.95, 0.9, 3, 2, 1, 1)
    assert a["top_image_id"] == "a2" and a["label"] == 1
    assert (b["rank"], b["score"], b["raw_score"]) == (2, 0.70, 0.6)
    assert pd.isna(c["rank"]) and np.isnan(c["score"]) and c["n_failed"] == 1


def test_aggregate_studies_mean_can_reverse_the_ranking():
    out = aggregate_studies(_table(), "mean").set_index("study")
    # mean: A = (0.2 + 0.9) / 2 = 0.55 = B = (0.5 + 0.6) / 2: a tie, both rank 1 (listed by name)
    assert out.loc["A", "raw_score"] == pytest.approx(0.55) and out.loc["B", "raw_score"] == pytest.approx(0.55)
    assert out.loc["A", "score"] == pytest.approx((0.10 + 0.95) / 2)
    assert out.loc["A", "rank"] == out.loc["B", "rank"] == 1 and out.loc["A", "aggregate"] == "mean"
    shifted = _table().assign(raw_score=[0.2, 0.7, np.nan, 0.5, 0.6, np.nan])
    assert aggregate_studies(shifted, "max")["study"].iloc[0] == "A"   # max: 0.7 > 0.6
    assert aggregate_studies(shifted, "mean")["study"].iloc[0] == "B"  # mean: 0.45 < 0.55


def test_study_keys_dicom_uid_else_folder(tree, tmp_path):
    png = tmp_path / "XR_WRIST" / "patient00001" / "study1_positive" / "image1.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"not really a png")
    keys = study_keys([*tree.source_path[:3], png])
    assert keys["study_instance_uid"].tolist()[:3] == tree.study_instance_uid[:3].tolist()
    assert keys["study"].iloc[0] == keys["study"].iloc[1] != keys["study"].iloc[2]  # views 0, 1: one study
    assert keys["study"].iloc[3] == str(png.parent) and keys["study_instance_uid"].iloc[3] == ""


def test_manifest_study_keys_join_patient_body_part_and_study():
    rows = pd.DataFrame({"patient_id": ["p1", "p1", "p1", "p2"], "body_part": ["XR_HAND", "XR_HAND", "XR_WRIST", "XR_HAND"],
                         "study": ["study1", "study1", "study1", "study1"]})
    keys = manifest_study_keys(rows)
    assert keys.tolist() == ["p1/XR_HAND/study1", "p1/XR_HAND/study1", "p1/XR_WRIST/study1", "p2/XR_HAND/study1"]
    assert manifest_study_keys(rows.assign(study="")) is None
    assert manifest_study_keys(rows.drop(columns="study")) is None


def test_study_sr_round_trip_references_every_image_with_its_scores(tree, tmp_path):
    views = tree[tree.study_instance_uid == tree.study_instance_uid[0]]
    assert len(views) == 2
    path = write_study_sr(views.source_path.tolist(), [0.25, 0.875], tmp_path / "study.dcm",
                          raw_scores=[0.125, 0.5], out_of_distribution=[True, False], how="max",
                          algorithm_parameters=["run=r1"])
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SR" and ds.StudyInstanceUID == views.study_instance_uid.iloc[0]
    assert ds.PatientID == pydicom.dcmread(views.source_path.iloc[0]).PatientID  # inherited, not copied
    evidence = {str(i.ReferencedSOPInstanceUID) for s in ds.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
    assert evidence == set(views.sop_instance_uid)
    report = read_study_sr(path)
    assert (report.score, report.raw_score, report.aggregate) == (0.875, 0.5, "max")
    assert set(report.study_referenced_uids) == set(views.sop_instance_uid)
    first, second = views.sop_instance_uid.tolist()
    assert report.images[first].score == 0.25 and report.images[first].raw_score == 0.125
    assert report.images[first].out_of_distribution and not report.images[second].out_of_distribution
    assert report.images[second].score == 0.875
    assert is_study_sr(ds)
    with pytest.raises(DataError, match="study SR"):
        read_score_sr(path)  # a per-image reader must not mistake it for one image's SR
    mean = read_study_sr(build_study_sr(views.source_path.tolist(), [0.25, 0.875], raw_scores=[0.125, 0.5],
                                        how="mean"))
    assert mean.aggregate == "mean" and mean.score == pytest.approx(0.5625) and mean.raw_score == pytest.approx(0.3125)


def test_study_sr_refuses_mixed_studies_duplicates_and_nan(tree):
    with pytest.raises(DataError, match="2 studies"):
        build_study_sr([tree.source_path[0], tree.source_path[2]], [0.1, 0.2])
    with pytest.raises(DataError, match="twice"):
        build_study_sr([tree.source_path[0], tree.source_path[0]], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        build_study_sr([tree.source_path[0]], [float("nan")])
    with pytest.raises(DataError, match="at least one"):
        build_study_sr([], [])


def test_a_new_version_names_its_predecessor(tree, tmp_path):
    first = write_study_sr([tree.source_path[0]], [0.5], tmp_path / "v1.dcm")
    old = pydicom.dcmread(first)
    new = build_study_sr(tree.source_path[:2].tolist(), [0.5, 0.6], previous_versions=[old])
    refs = [i.ReferencedSOPInstanceUID for s in new.PredecessorDocumentsSequence
            for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence]
    assert refs == [old.SOPInstanceUID]


def test_triage_studies_writes_ranked_csv_and_one_sr_per_dicom_study(tree, tmp_path):
    paths = tree.source_path.tolist()
    raw = [0.1, 0.2, 0.9, 0.3, 0.4, 0.5]
    df = pd.DataFrame({"image_id": tree.sop_instance_uid, "source_path": paths, "score": [r / 2 for r in raw],
                       "raw_score": raw, "ood": False, "status": "ok", "reason": ""})
    df["sr_path"] = [str(write_score_sr(p, s, tmp_path / "sr" / f"{i}.dcm"))
                     for p, s, i in zip(paths, df.score, df.image_id, strict=True)]
    table = triage_studies(df, tmp_path, "max")
    written = pd.read_csv(tmp_path / "studies.csv", dtype={"study": str, "study_instance_uid": str})
    assert written["rank"].tolist() == [1, 2, 3]
    assert written["raw_score"].tolist() == pytest.approx([0.9, 0.5, 0.2])  # studies (2,3), (4,5), (0,1)
    assert written["study_instance_uid"].iloc[0] == tree.study_instance_uid[2]
    assert (written["n_images"] == 2).all()
    for row in table.itertuples(index=False):
        report = read_study_sr(row.sr_path)
        assert report.study_instance_uid == row.study_instance_uid
        assert report.raw_score == pytest.approx(row.raw_score)
        assert len(report.images) == 2


@pytest.mark.skipif(DSRDUMP is None, reason=dcmtk_missing_reason("dsrdump"))
def test_dsrdump_reads_the_study_sr(tree, tmp_path):
    path = write_study_sr(tree.source_path[:2].tolist(), [0.3, 0.7], tmp_path / "s.dcm", raw_scores=[0.1, 0.2])
    dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert "SALAD study anomaly score" in dump.stdout and '"Maximum"' in dump.stdout
    assert dump.stdout.count('NUM:(,,"SALAD anomaly score")') == 2  # one per image
