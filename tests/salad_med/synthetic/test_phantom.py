"""Tests of the synthetic radiograph phantoms: truth consistency, determinism, writers, DICOM."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from salad_med.synthetic.phantom import (
    ANOMALIES,
    BODY_PARTS,
    MURA_PATH_PATTERN,
    PhantomSpec,
    generate_demo_dataset,
    load_truth,
    make_phantom,
    random_spec,
    write_dicom,
    write_dicom_tree,
    write_mura_tree,
    write_png,
)

pydicom = pytest.importorskip("pydicom")

TRUTH_CASES = [
    (bp, anomaly, carrier, oof, size)
    for i, bp in enumerate(BODY_PARTS)
    for j, anomaly in enumerate((None, *ANOMALIES))
    for carrier, oof, size in [(("bright", False, (256, 208)), ("dark", True, (200, 240)),
                                (None, False, (64, 64)), ("bright", True, (96, 80)))[(i + j) % 4]]
]


def _display(ph):
    return ph.display()


@pytest.mark.parametrize(("body_part", "anomaly", "carrier", "out_of_frame", "size"), TRUTH_CASES)
def test_truth_consistent(body_part, anomaly, carrier, out_of_frame, size):
    spec = PhantomSpec(height=size[0], width=size[1], body_part=body_part, anomaly=anomaly, carrier=carrier,
                       carrier_out_of_frame=out_of_frame, carrier_rotation=7.0 if carrier else 0.0,
                       monochrome1=anomaly == "lesion", bits_stored=(8, 12, 16)[len(body_part) % 3])
    ph = make_phantom(spec, seed=11)
    h, w = size
    assert ph.image.shape == (h, w)
    for m in (ph.body_mask, ph.carrier_mask, ph.anomaly_mask, ph.bone_mask, ph.marker_mask):
        assert m.shape == (h, w) and m.dtype == bool
    assert ph.body_mask.sum() > 0.03 * h * w
    assert ph.bone_mask.any() and not (ph.bone_mask & ~ph.body_mask).any()
    assert ph.label == int(anomaly is not None) and ph.anomaly == anomaly
    if anomaly is None:
        assert not ph.anomaly_mask.any()
    else:
        assert ph.anomaly_mask.any()
        assert not (ph.anomaly_mask & ~ph.body_mask).any()
    if carrier is None:
        assert ph.carrier_polygon is None and not ph.carrier_mask.any()
    else:
        assert ph.carrier_polygon.shape == (4, 2)
        inside = (ph.body_mask & ph.carrier_mask).sum() / ph.body_mask.sum()
        assert inside >= 0.99
    assert not (ph.marker_mask & ph.body_mask).any()
    assert ph.image.max() < 2**ph.bits_stored
    assert ph.image.dtype == (np.uint8 if ph.bits_stored == 8 else np.uint16)
    assert ph.photometric == ("MONOCHROME1" if spec.monochrome1 else "MONOCHROME2")


@pytest.mark.parametrize("carrier", ["bright", "dark"])
def test_contrast_body_brighter_than_carrier(carrier):
    """Display polarity: soft tissue clearly above the carrier field, bone well above soft tissue."""
    for seed in range(3):
        ph = make_phantom(PhantomSpec(body_part=BODY_PARTS[seed], carrier=carrier, monochrome1=seed == 1,
                                      bits_stored=(8, 12, 16)[seed]), seed)
        d = _display(ph)
        field = np.median(d[ph.carrier_mask & ~ph.body_mask & ~ph.marker_mask])
        outside = np.median(d[~ph.carrier_mask])
        soft = np.median(d[ph.body_mask & ~ph.bone_mask])
        bone = np.percentile(d[ph.bone_mask], 90)
        assert soft - field > 0.08
        assert bone - soft > 0.2
        assert (field - outside > 0.1) if carrier == "bright" else (outside - field > 0.1)


def test_monochrome1_stored_inverted():
    kw = {"body_part": "XR_FOREARM", "carrier": "bright", "bits_stored": 12}
    m1 = make_phantom(PhantomSpec(monochrome1=True, **kw), 5)
    m2 = make_phantom(PhantomSpec(monochrome1=False, **kw), 5)
    assert np.array_equal(m1.body_mask, m2.body_mask)
    bg1 = m1.image[m1.carrier_mask & ~m1.body_mask].mean()
    bg2 = m2.image[m2.carrier_mask & ~m2.body_mask].mean()
    assert m1.image[m1.bone_mask].mean() < bg1  # bone dark when stored MONOCHROME1
    assert m2.image[m2.bone_mask].mean() > bg2
    np.testing.assert_allclose(m1.display(), m2.display(), atol=0.02)


def test_anomalies_visible():
    for anomaly in ANOMALIES:
        for seed in range(3):
            ph = make_phantom(PhantomSpec(body_part="XR_FOREARM", anomaly=anomaly, noise=0.0), seed)
            d = _display(ph)
            a = d[ph.anomaly_mask].mean()
            bone = d[ph.bone_mask & ~ph.anomaly_mask].mean()
            if anomaly == "implant":
                assert a > 0.9, (anomaly, seed, a)
            else:
                assert a < bone - 0.05, (anomaly, seed, a, bone)


def test_carrier_exterior_uniform():
    """Outside the carrier only background (mild gradient + noise) and markers clear of the border."""
    for seed in range(4):
        spec = PhantomSpec(carrier=("bright", "dark")[seed % 2], carrier_rotation=4.0 * seed, noise=0.01)
        ph = make_phantom(spec, seed)
        d = _display(ph)
        ext = d[~ph.carrier_mask & ~ph.marker_mask]
        p5, p95 = np.percentile(ext, [5, 95])
        assert p95 - p5 < 0.06
        inner, outer = ph.carrier_mask.copy(), ph.carrier_mask.copy()
        for axis in (0, 1):
            for shift in (-2, 2):
                inner &= np.roll(ph.carrier_mask, shift, axis)
                outer |= np.roll(ph.carrier_mask, shift, axis)
        ring = outer & ~inner  # 2-px band along the carrier border: no markers
        assert not (ring & ph.marker_mask).any()


def test_markers_small_bright_outside_body():
    ph = make_phantom(PhantomSpec(markers=True, carrier="dark"), 3)
    d = _display(ph)
    assert ph.marker_mask.any()
    assert ph.marker_mask.mean() < 0.03
    assert np.percentile(d[ph.marker_mask], 75) > 0.8
    no = make_phantom(PhantomSpec(markers=False, carrier="dark"), 3)
    assert not no.marker_mask.any()


def test_same_seed_identical_different_seed_differs():
    spec = random_spec(np.random.default_rng(1), anomaly="fracture", bits_stored=16)
    a, b, c = make_phantom(spec, 7), make_phantom(spec, 7), make_phantom(spec, 8)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.anomaly_mask, b.anomaly_mask)
    assert a.image.tobytes() != c.image.tobytes()
    s1 = random_spec(np.random.default_rng(4))
    s2 = random_spec(np.random.default_rng(4))
    assert s1 == s2


@pytest.mark.parametrize(("bits", "lo", "hi"), [(8, 200, 256), (12, 2000, 4096), (16, 40000, 65536)])
def test_bit_depth_range(bits, lo, hi):
    ph = make_phantom(PhantomSpec(bits_stored=bits), 0)
    assert lo < int(ph.image.max()) < hi


def test_out_of_frame_polygon_extends_outside():
    for seed in range(4):
        ph = make_phantom(PhantomSpec(carrier="bright", carrier_out_of_frame=True, carrier_rotation=5.0), seed)
        h, w = ph.image.shape
        x, y = ph.carrier_polygon[:, 0], ph.carrier_polygon[:, 1]
        assert (x < 0).any() or (x > w - 1).any() or (y < 0).any() or (y > h - 1).any()
        assert ph.carrier_mask.any()
        assert (ph.body_mask & ph.carrier_mask).sum() >= 0.99 * ph.body_mask.sum()
    inside = make_phantom(PhantomSpec(carrier="bright", carrier_rotation=-15.0), 0)
    x, y = inside.carrier_polygon[:, 0], inside.carrier_polygon[:, 1]
    assert x.min() >= 0 and y.min() >= 0 and x.max() <= 415 and y.max() <= 511


@pytest.mark.parametrize("angle", [-15.0, -6.5, 0.0, 12.0])
def test_rotation_honoured(angle):
    ph = make_phantom(PhantomSpec(carrier="dark", carrier_rotation=angle), 2)
    p = ph.carrier_polygon
    edges = np.roll(p, -1, axis=0) - p
    # displayed angle (y axis up) of each edge, folded to (-45, 45]
    ang = np.degrees(np.arctan2(-edges[:, 1], edges[:, 0]))
    folded = (ang + 45.0) % 90.0 - 45.0
    np.testing.assert_allclose(folded, angle, atol=1e-6)
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    assert lengths.min() > 0.5 * 416  # long straight borders
    # polygon area vs mask area agree (shoelace)
    area = 0.5 * abs(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))
    assert abs(ph.carrier_mask.sum() - area) / area < 0.01


def test_spec_validation():
    with pytest.raises(ValueError, match="carrier_rotation"):
        PhantomSpec(carrier_rotation=20)
    with pytest.raises(ValueError, match="body_part"):
        PhantomSpec(body_part="CHEST")
    with pytest.raises(ValueError, match="bits_stored"):
        PhantomSpec(bits_stored=10)
    with pytest.raises(ValueError, match="unknown"):
        random_spec(np.random.default_rng(0), colour="red")


def test_write_png_roundtrip_and_deterministic(tmp_path):
    for bits in (8, 16):
        ph = make_phantom(PhantomSpec(height=96, width=80, bits_stored=bits), 1)
        a, b = write_png(ph.image, tmp_path / f"a{bits}.png"), write_png(ph.image, tmp_path / f"b{bits}.png")
        assert a.read_bytes() == b.read_bytes()
        back = np.asarray(Image.open(a))
        assert np.array_equal(back.astype(ph.image.dtype), ph.image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a16.png", "a8.png", "b16.png", "b8.png"]
    with pytest.raises(ValueError, match="uint8/uint16"):
        write_png(np.zeros((4, 4), dtype=np.float32), tmp_path / "x.png")


@pytest.fixture(scope="module")
def mura_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mura")
    df = write_mura_tree(root, n_patients=8, seed=3, size=(96, 80), abnormal_fraction=0.4)
    return root, df


def test_mura_tree_layout(mura_tree):
    root, df = mura_tree
    mura = root / "MURA-v1.1"
    files = sorted(str(p.relative_to(root)) for p in mura.rglob("*.png"))
    assert len(files) == len(df) > 8
    for f in files:
        assert re.search(rf"^MURA-v1\.1/(train|valid)/{MURA_PATH_PATTERN}$", f), f
    listed = []
    for split in ("train", "valid"):
        lines = (mura / f"{split}_image_paths.csv").read_text().splitlines()
        assert all(line.startswith(f"MURA-v1.1/{split}/") for line in lines)
        listed += lines
        studies = pd.read_csv(mura / f"{split}_labeled_studies.csv", header=None, names=["study", "label"])
        for study, label in studies.itertuples(index=False):
            assert study.endswith("/") and (root / study).is_dir()
            assert label == int(study.rstrip("/").endswith("_positive"))
    assert sorted(listed) == files
    assert set(df.split) == {"train", "valid"}
    # split by patient, several body parts, every image of a positive study is anomalous
    assert df.groupby("patient_id").split.nunique().max() == 1
    assert df.body_part.nunique() >= 3
    assert (df.label == df.study_path.str.endswith("_positive/").astype(int)).all()
    assert df.study.str.fullmatch(r"study\d+").all()
    assert (df.label == (df.anomaly.fillna("") != "").astype(int)).all()
    n_pos = df.drop_duplicates("study_path").label.sum()
    assert n_pos == round(0.4 * df.study_path.nunique())
    assert pd.read_csv(root / "truth.csv").image_id.tolist() == df.image_id.tolist()


def test_mura_tree_truth_matches_files(mura_tree):
    root, df = mura_tree
    for row in df.iloc[:6].itertuples():
        img = np.asarray(Image.open(root / row.path))
        truth = load_truth(root / row.truth_path)
        assert img.shape == truth["body_mask"].shape == (96, 80)
        assert truth["label"] == row.label and truth["patient_id"] == row.patient_id
        assert truth["body_part"] == row.body_part
        if truth["label"]:
            assert truth["anomaly_mask"].any()
        if row.photometric == "MONOCHROME2":
            assert img[truth["bone_mask"]].mean() > img[~truth["body_mask"]].mean()


def test_mura_tree_deterministic(tmp_path, mura_tree):
    root, df = mura_tree
    df2 = write_mura_tree(tmp_path, n_patients=8, seed=3, size=(96, 80), abnormal_fraction=0.4)
    assert df2.drop(columns="source_path").equals(df.drop(columns="source_path"))
    for rel in df.path.iloc[:: max(1, len(df) // 5)]:
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes()


DICOM_CASES = [("MONOCHROME1", 8, "CR", "explicit little endian"), ("MONOCHROME2", 12, "DX", "implicit little endian"),
               ("MONOCHROME1", 16, "DX", "rle lossless"), ("MONOCHROME2", 16, "CR", "explicit little endian")]


@pytest.mark.parametrize(("photometric", "bits", "modality", "ts"), DICOM_CASES)
def test_write_dicom_reread(tmp_path, photometric, bits, modality, ts):
    from pydicom.uid import UID

    spec = PhantomSpec(height=128, width=104, bits_stored=bits, monochrome1=photometric == "MONOCHROME1",
                       anomaly="implant", patient_id="patient00042")
    ph = make_phantom(spec, 9)
    a = write_dicom(ph, tmp_path / "a.dcm", modality=modality, transfer_syntax=ts, rescale=(0.5, -10.0))
    b = write_dicom(ph, tmp_path / "b.dcm", modality=modality, transfer_syntax=ts, rescale=(0.5, -10.0))
    assert a.read_bytes() == b.read_bytes()
    ds = pydicom.dcmread(a)
    assert ds.PhotometricInterpretation == photometric
    assert ds.BitsStored == bits and ds.HighBit == bits - 1
    assert ds.BitsAllocated == (8 if bits == 8 else 16)
    assert np.array_equal(ds.pixel_array, ph.image)
    assert ds.Modality == modality
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1")
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert UID(ds[key].value).is_valid
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.PatientID == "patient00042" and ds.BodyPartExamined == "WRIST"
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == -10.0
    assert float(ds.WindowWidth) > 0 and len(ds.PixelSpacing) == 2
    assert ("ImagerPixelSpacing" in ds) and ds.ImageLaterality == ph.laterality
    # the window covers the body part in rescaled units
    lo = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    hi = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    body = np.median(ph.image[ph.body_mask]) * 0.5 - 10.0
    assert lo <= body <= hi
    # a different seed gives different UIDs, the same study index the same StudyInstanceUID
    other = write_dicom(make_phantom(spec, 10), tmp_path / "c.dcm")
    ds2 = pydicom.dcmread(other)
    assert ds2.SOPInstanceUID != ds.SOPInstanceUID and ds2.StudyInstanceUID == ds.StudyInstanceUID


def test_write_dicom_rejects_bad_arguments(tmp_path):
    ph = make_phantom(PhantomSpec(height=64, width=64), 0)
    with pytest.raises(ValueError, match="modality"):
        write_dicom(ph, tmp_path / "x.dcm", modality="MR")
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_dicom(ph, tmp_path / "x.dcm", transfer_syntax="jpeg")
    with pytest.raises(ValueError, match="keyword"):
        write_dicom(ph, tmp_path / "x.dcm", NotAKeyword="1")
    assert not list(tmp_path.iterdir())  # atomic: nothing left behind


def test_write_dicom_tree_mix(tmp_path):
    df = write_dicom_tree(tmp_path, n=6, seed=1, size=(96, 80))
    assert len(df) == 6 and set(df.photometric) == {"MONOCHROME1", "MONOCHROME2"}
    assert set(df.bits) == {8, 12, 16} and set(df.modality) == {"CR", "DX"}
    assert df.sop_instance_uid.is_unique
    # the two views of a patient share one study (UID, body part, label) and one fake name
    per_patient = df.groupby("patient_id")
    assert (per_patient[["study_instance_uid", "body_part", "label"]].nunique() == 1).all().all()
    names = per_patient.source_path.agg(lambda ps: {str(pydicom.dcmread(p).PatientName) for p in ps})
    assert names.map(len).eq(1).all()
    for row in df.itertuples():
        ds = pydicom.dcmread(Path(row.source_path))
        truth = load_truth(tmp_path / row.truth_path)
        assert ds.PhotometricInterpretation == row.photometric == truth["photometric"]
        assert ds.pixel_array.shape == truth["body_mask"].shape
        assert str(ds.SOPInstanceUID) == row.sop_instance_uid


def test_generate_demo_dataset(tmp_path):
    df = generate_demo_dataset(tmp_path, n_patients=3, size=64, seed=0, n_dicom=2)
    assert set(df.format) == {"png", "dicom"}
    assert (df.format == "dicom").sum() == 2
    assert all(Path(p).is_file() for p in df.source_path)
    assert (tmp_path / "mura" / "MURA-v1.1" / "train_image_paths.csv").is_file()
    assert (tmp_path / "dicom" / "truth.csv").is_file()


def test_speed_512():
    import time

    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(10)]
    make_phantom(specs[0], 0)
    t0 = time.perf_counter()
    for i, s in enumerate(specs):
        make_phantom(s, i)
    per = (time.perf_counter() - t0) / len(specs)
    assert per < 0.1, f"{per * 1000:.1f} ms per 512x416 phantom"  # ~15 ms typical; loose for shared CPUs
    assert math.isfinite(per)


@pytest.mark.parametrize("anomaly", ANOMALIES)
def test_anomaly_scale_grows_anomaly_and_keeps_truth(anomaly):
    """anomaly_scale enlarges the anomaly (summed over seeds), which stays inside the body part;
    everything but the anomaly is drawn identically."""
    areas = {}
    for scale in (1.0, 4.0):
        total = 0
        for seed in range(6):
            spec = PhantomSpec(height=128, width=112, body_part=("XR_FOREARM", "XR_HUMERUS")[seed % 2],
                               anomaly=anomaly, anomaly_scale=scale)
            ph = make_phantom(spec, seed)
            assert ph.anomaly_mask.any() and not (ph.anomaly_mask & ~ph.body_mask).any()
            base = make_phantom(dataclasses.replace(spec, anomaly_scale=1.0), seed)
            assert (ph.carrier_mask == base.carrier_mask).all() and (ph.bone_mask == base.bone_mask).all()
            total += int(ph.anomaly_mask.sum())
        areas[scale] = total
    assert areas[4.0] > 1.8 * areas[1.0], areas


def test_anomaly_scale_default_and_validation(tmp_path):
    rng = np.random.default_rng(5)
    spec = random_spec(rng, height=96, width=80, anomaly="lesion")
    assert spec.anomaly_scale == 1.0
    assert random_spec(np.random.default_rng(5), height=96, width=80, anomaly="lesion", anomaly_scale=2.0) == \
        dataclasses.replace(spec, anomaly_scale=2.0)  # the rng is consumed the same way
    for bad in (0.1, 9.0):
        with pytest.raises(ValueError, match="anomaly_scale"):
            PhantomSpec(anomaly_scale=bad)
    df = write_mura_tree(tmp_path / "m", n_patients=4, seed=1, size=(64, 64), abnormal_fraction=0.5,
                         body_parts=("XR_FOREARM",), anomaly_scale=3.0)
    pos = df[df.label == 1]
    assert len(pos) > 0 and set(df.body_part) == {"XR_FOREARM"}
    for row in pos.itertuples():
        truth = load_truth(tmp_path / "m" / row.truth_path)
        assert truth["anomaly_mask"].any() and not (truth["anomaly_mask"] & ~truth["body_mask"]).any()


def test_spec_overrides_fix_fields_of_every_image(tmp_path):
    df = write_mura_tree(tmp_path, n_patients=6, seed=3, size=(128, 104),
                         spec_overrides={"carrier": None, "markers": False})
    assert len(df) > 0 and (df["carrier"] == "").all()
    for truth_path in df["truth_path"]:
        truth = load_truth(tmp_path / truth_path)
        assert not truth["carrier_mask"].any() and not truth["marker_mask"].any()
        assert truth["body_mask"].any()
