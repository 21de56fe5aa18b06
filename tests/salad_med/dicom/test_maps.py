"""Anomaly maps as DICOM: fractional Segmentations referencing the scored image, referenced by the SR."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.dicom.maps import (
    MAP_LEVELS,
    MAP_SERIES_DESCRIPTION,
    build_map_segmentation,
    read_map_segmentation,
    write_map_segmentation,
)
from salad_med.dicom.sr import ANOMALY_MAP, read_score_sr, write_score_sr
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool
from salad_med.errors import DataError
from salad_med.synthetic.phantom import write_dicom_tree

DCMDUMP = dcmtk_tool("dcmdump")
DSRDUMP = dcmtk_tool("dsrdump")
DCIODVFY = shutil.which("dciodvfy")  # dicom3tools (not dcmtk): the IOD validator, when installed
runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_dicoms(tmp_path_factory):
    return write_dicom_tree(tmp_path_factory.mktemp("map_dicom"), n=3, seed=5, size=(128, 112))


def _map(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) + 3.0 * (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) == 60)


def test_map_round_trip_pydicom(phantom_dicoms, tmp_path):
    src_path = phantom_dicoms.source_path[0]
    src = pydicom.dcmread(src_path)
    amap = _map((128, 112))
    out = write_map_segmentation(src_path, amap, tmp_path / "sub" / "map.dcm", kind="occlusion")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns) and int(ds.NumberOfFrames) == 1
    # Patient / Study inherited from the source; a new series of its own
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SeriesDescription == MAP_SERIES_DESCRIPTION
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    prop = ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == (ANOMALY_MAP.value, ANOMALY_MAP.scheme_designator)
    back = read_map_segmentation(out)
    assert back.kind == "occlusion" and back.scale == pytest.approx(amap.max(), rel=1e-5)
    assert back.referenced_sop_instance_uid == src.SOPInstanceUID
    # 8-bit fraction of the map's maximum, negatives clipped: at most half a level off
    np.testing.assert_allclose(back.fraction, np.clip(amap / amap.max(), 0, 1), atol=0.5 / MAP_LEVELS + 1e-6)
    assert np.unravel_index(back.fraction.argmax(), back.fraction.shape) == np.unravel_index(amap.argmax(), amap.shape)


def test_map_refused_when_it_does_not_fit(phantom_dicoms, tmp_path):
    src = phantom_dicoms.source_path[1]
    with pytest.raises(DataError, match=r"shape \(64, 64\) does not fit the single-frame 128x112 image"):
        build_map_segmentation(src, np.zeros((64, 64)))
    with pytest.raises(ValueError, match="NaN"):
        build_map_segmentation(src, np.full((128, 112), np.nan))
    with pytest.raises(DataError, match="cannot read DICOM"):
        build_map_segmentation(tmp_path / "missing.dcm", np.zeros((128, 112)))
    with pytest.raises(DataError, match="not a salad-med anomaly map"):
        read_map_segmentation(src)
    # a map without any positive value (nothing raises the score) is all zeros, scale 0
    flat = read_map_segmentation(write_map_segmentation(src, -np.ones((128, 112)), tmp_path / "flat.dcm"))
    assert flat.scale == 0.0 and not flat.fraction.any()


def test_sr_references_the_map(phantom_dicoms, tmp_path):
    src = phantom_dicoms.source_path[2]
    seg = write_map_segmentation(src, _map((128, 112), 1), tmp_path / "map.dcm")
    sr = write_score_sr(src, 0.9, tmp_path / "sr.dcm", raw_score=1.25, anomaly_map=seg)
    report = read_score_sr(sr)
    assert report.anomaly_map_sop_instance_uid == pydicom.dcmread(seg).SOPInstanceUID
    assert report.referenced_sop_instance_uid == pydicom.dcmread(src).SOPInstanceUID  # still the image
    ds = pydicom.dcmread(sr)
    evidence = {ref.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert report.anomaly_map_sop_instance_uid in evidence and report.referenced_sop_instance_uid in evidence
    assert read_score_sr(write_score_sr(src, 0.9, tmp_path / "plain.dcm")).anomaly_map_sop_instance_uid is None


@pytest.mark.dcmtk
@pytest.mark.skipif(DCMDUMP is None or DSRDUMP is None, reason=dcmtk_missing_reason("dsrdump"))
def test_dcmtk_reads_map_and_sr(phantom_dicoms, tmp_path):
    src = phantom_dicoms.source_path[0]
    seg = write_map_segmentation(src, _map((128, 112)), tmp_path / "map.dcm")
    sr = write_score_sr(src, 0.5, tmp_path / "sr.dcm", anomaly_map=seg)
    for path in (seg, sr):
        proc = subprocess.run([DCMDUMP, str(path)], capture_output=True, timeout=30)
        assert proc.returncode == 0 and proc.stderr.decode("latin-1").strip() == "", proc.stderr
    text = subprocess.run([DCMDUMP, str(seg)], capture_output=True, timeout=30).stdout.decode("latin-1")
    assert "FRACTIONAL" in text and "(0062,000e) US 255" in text  # MaximumFractionalValue
    proc = subprocess.run([DSRDUMP, str(sr)], capture_output=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr.decode("latin-1").strip() == "", proc.stderr
    assert 'IMAGE:(,,"Anomaly map")=(SG image,)' in proc.stdout.decode("latin-1")


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
def test_dciodvfy_validates_map_and_sr(phantom_dicoms, tmp_path):
    src = phantom_dicoms.source_path[0]
    seg = write_map_segmentation(src, _map((128, 112)), tmp_path / "map.dcm")
    sr = write_score_sr(src, 0.5, tmp_path / "sr.dcm", anomaly_map=seg)
    for path in (seg, sr):
        proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, timeout=60)
        errors = [line for line in proc.stderr.decode("latin-1").splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


def test_score_maps_cli(tiny_dicom_run, tmp_path):
    files = tiny_dicom_run.files.head(3)
    folder = tmp_path / "in"
    folder.mkdir()
    for p in files["source_path"]:
        shutil.copy(p, folder)
    png = tmp_path / "in" / "plain.png"
    from PIL import Image

    pixels = pydicom.dcmread(files["source_path"].iloc[0]).pixel_array.astype(np.float64)
    Image.fromarray((255 * pixels / pixels.max()).astype(np.uint8)).save(png)
    out = tmp_path / "out"
    res = runner.invoke(app, ["score", "--run", str(tiny_dicom_run.run_dir), "--maps", "--output", str(out),
                              str(folder)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    df = pd.read_csv(out / "scores.csv", dtype={"image_id": str})
    assert len(df) == 4 and (df["status"] == "ok").all() and df["map_path"].notna().all()
    dicom = df[df["map_path"].str.endswith(".dcm")]
    assert len(dicom) == 3
    for row in dicom.itertuples(index=False):
        src = pydicom.dcmread(row.source_path)
        seg = read_map_segmentation(row.map_path)
        assert seg.referenced_sop_instance_uid == row.image_id == src.SOPInstanceUID
        assert seg.fraction.shape == (src.Rows, src.Columns)  # back on the file's own grid
        assert seg.scale == pytest.approx(row.map_max, rel=1e-5) and seg.kind == "occlusion"
        assert read_score_sr(row.sr_path).anomaly_map_sop_instance_uid == seg.sop_instance_uid
    plain = df[df["map_path"].str.endswith(".png")].iloc[0]
    with Image.open(plain["map_path"]) as im:
        assert im.size[::-1] == pydicom.dcmread(files["source_path"].iloc[0]).pixel_array.shape
    html = (out / "report.html").read_text()
    assert html.count('<div class="tile ') == 4 and "occlusion anomaly map" in html
    res = runner.invoke(app, ["score", "--run", str(tiny_dicom_run.run_dir), "--maps", "--map-kind", "gradcam",
                              "--output", str(tmp_path / "bad"), str(folder)])
    assert res.exit_code == 2 and "--map-kind" in res.output
