"""DICOM SR output: highdicom writes, pydicom and dcmtk's dsrdump read back."""

from __future__ import annotations

import logging
import subprocess
import warnings

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage

from salad_med import __version__
from salad_med.dicom.sr import (
    DEFAULT_SERIES_DESCRIPTION,
    build_score_sr,
    read_score_sr,
    write_score_sr,
)
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool
from salad_med.errors import DataError
from salad_med.synthetic.phantom import write_dicom_tree

DSRDUMP = dcmtk_tool("dsrdump")
needs_dcmtk = pytest.mark.skipif(DSRDUMP is None, reason=dcmtk_missing_reason("dsrdump"))


@pytest.fixture(scope="module")
def phantom_dicoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_dicom")
    return write_dicom_tree(root, n=3, seed=5, size=(128, 128))


def _num_items(ds):
    """(meaning, value) of every NUM content item, depth first."""
    found = []

    def walk(items):
        for item in items or []:
            if item.ValueType == "NUM":
                found.append((item.ConceptNameCodeSequence[0].CodeMeaning,
                              float(item.MeasuredValueSequence[0].NumericValue),
                              item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
            walk(item.get("ContentSequence"))

    walk(ds.ContentSequence)
    return found


def test_sr_round_trip_pydicom(phantom_dicoms, tmp_path):
    src_path = phantom_dicoms.source_path[0]
    src = pydicom.dcmread(src_path)
    out = write_score_sr(src_path, 0.8312, tmp_path / "sub" / "sr.dcm", raw_score=0.412345,
                         algorithm_parameters=["k=20"])
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.Modality == "SR"
    assert ds.SeriesDescription == DEFAULT_SERIES_DESCRIPTION
    # inherited from the evidence, not hand-copied
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.PatientName == src.PatientName
    # new series and instance
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SOPInstanceUID != src.SOPInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert _num_items(ds) == [("SALAD anomaly score", 0.8312, "1"), ("SALAD raw anomaly score", 0.412345, "1")]
    report = read_score_sr(out)
    assert report.score == 0.8312 and report.raw_score == 0.412345
    assert report.referenced_sop_instance_uid == src.SOPInstanceUID
    assert report.referenced_sop_class_uid == src.SOPClassUID
    assert (report.algorithm_name, report.algorithm_version) == ("salad-med", __version__)
    assert report.sop_instance_uid == ds.SOPInstanceUID
    # written atomically: nothing but the SR in the folder
    assert [p.name for p in out.parent.iterdir()] == ["sr.dcm"]


def test_sr_from_dataset_and_options(phantom_dicoms):
    src = pydicom.dcmread(phantom_dicoms.source_path[1])
    sr = build_score_sr(src, 0.25, algorithm_name="salad-x", algorithm_version="9.9", series_number=7,
                        series_description="test series", series_instance_uid="1.2.3.4",
                        sop_instance_uid="1.2.3.4.5")
    assert (sr.SeriesNumber, sr.SeriesDescription, sr.SeriesInstanceUID, sr.SOPInstanceUID) == \
        (7, "test series", "1.2.3.4", "1.2.3.4.5")
    report = read_score_sr(sr)
    assert (report.score, report.raw_score) == (0.25, None)
    assert (report.algorithm_name, report.algorithm_version) == ("salad-x", "9.9")
    assert "PixelData" in src  # the caller's dataset is not modified


@needs_dcmtk
@pytest.mark.dcmtk
def test_dsrdump_parses_and_shows_score(phantom_dicoms, tmp_path):
    out = write_score_sr(phantom_dicoms.source_path[2], 0.61803, tmp_path / "sr.dcm", raw_score=1.5)
    proc = subprocess.run([DSRDUMP, str(out)], capture_output=True, timeout=30)
    text = proc.stdout.decode("latin-1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode("latin-1").strip() == ""
    assert "Comprehensive SR Document" in text
    assert 'NUM:(,,"SALAD anomaly score")="0.61803" (1,UCUM,"no units")' in text
    assert 'NUM:(,,"SALAD raw anomaly score")="1.5"' in text
    assert 'TEXT:(,,"Algorithm Name")="salad-med"' in text
    assert DEFAULT_SERIES_DESCRIPTION in text


def test_real_dicom_with_bad_birth_date(dicom_sample, tmp_path):
    # 966_fixed.dcm carries an anonymiser hash in PatientBirthDate (not a DA): dropped, not fatal
    src = dicom_sample / "966_fixed.dcm"
    out = write_score_sr(src, 0.5, tmp_path / "sr.dcm")
    ds = pydicom.dcmread(out)
    assert ds.PatientBirthDate == ""
    assert read_score_sr(ds).referenced_sop_instance_uid == pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID


def test_no_patient_name_in_logs_or_warnings(phantom_dicoms, tmp_path, caplog):
    src = pydicom.dcmread(phantom_dicoms.source_path[0])
    src.PatientName = "Onecomponentname"  # highdicom warns about this name, quoting it
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        write_score_sr(src, 0.1, tmp_path / "sr.dcm")
    assert "Onecomponentname" not in caplog.text
    assert all("Onecomponentname" not in str(w.message) for w in caught)


@pytest.mark.parametrize("score", [float("nan"), float("inf")])
def test_non_finite_score_rejected(phantom_dicoms, tmp_path, score):
    with pytest.raises(ValueError, match="finite"):
        write_score_sr(phantom_dicoms.source_path[0], score, tmp_path / "sr.dcm")
    assert not (tmp_path / "sr.dcm").exists()


def test_bad_sources(phantom_dicoms, tmp_path):
    src = pydicom.dcmread(phantom_dicoms.source_path[0])
    del src.StudyInstanceUID
    with pytest.raises(DataError, match="StudyInstanceUID"):
        build_score_sr(src, 0.5)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match="junk.dcm"):
        write_score_sr(junk, 0.5, tmp_path / "sr.dcm")
    with pytest.raises(DataError, match="not a salad-med score SR"):
        read_score_sr(phantom_dicoms.source_path[0])


def test_write_score_srs_for_score_tables(phantom_dicoms, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from salad_med.dicom.sr import write_score_srs

    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    uid = str(pydicom.dcmread(phantom_dicoms.source_path[0], stop_before_pixels=True).SOPInstanceUID)
    table = pd.DataFrame({
        "image_id": [uid, "a", "bad"],
        "source_path": [phantom_dicoms.source_path[0], str(png), phantom_dicoms.source_path[1]],
        "score": [0.7, 0.2, float("nan")], "raw_score": [0.05, 0.01, float("nan")],
        "status": ["ok", "ok", "failed"], "reason": ["", "", "unreadable"],
    })
    paths = write_score_srs(table, tmp_path / "sr")
    assert paths == [str(tmp_path / "sr" / f"{uid}.dcm"), "", ""]
    report = read_score_sr(paths[0])
    assert (report.score, report.raw_score, report.referenced_sop_instance_uid) == (0.7, 0.05, uid)
