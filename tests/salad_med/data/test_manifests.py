"""Manifest builders, validation on load and shard merging (salad_med.data.manifests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.split import write_mura_csvs
from salad_med.cli.app import app
from salad_med.data.manifests import (
    REQUIRED_COLUMNS,
    build_dicom_manifest,
    build_folder_manifest,
    build_mura_manifest,
    build_nih_manifest,
    find_shards,
    load_manifest,
    merge_manifests,
    merge_shards,
    parse_labels,
    shard_file_name,
    validate_manifest,
    write_manifest,
)
from salad_med.errors import DataError

runner = CliRunner()


# --------------------------------------------------------------------------------------- MURA
@pytest.fixture(scope="module")
def mura_root(tmp_path_factory) -> Path:
    """Official-style MURA CSVs + empty image files: 60 images, 15 patients, 25 studies."""
    root = tmp_path_factory.mktemp("mura")
    stats = write_mura_csvs(root, n_images=60, n_patients=15, n_studies=25, n_valid_patients=4, seed=3,
                            touch_files=True)
    assert stats == {"images": 60, "patients": 15, "studies": 25, "abnormal_images": stats["abnormal_images"]}
    return root


def test_mura_csv_and_tree_agree(mura_root):
    from_csv = build_mura_manifest(mura_root, source="csv")
    from_tree = build_mura_manifest(mura_root, source="tree")
    pd.testing.assert_frame_equal(from_csv, from_tree)
    assert list(from_csv.columns) == [*REQUIRED_COLUMNS, "official_split"]
    assert len(from_csv) == 60 and from_csv["patient_id"].nunique() == 15
    # ids and fields parsed from the path, label = the study folder suffix
    pattern = r"(train|valid)/XR_[A-Z]+/patient\d{5}/study\d+_(positive|negative)/image\d+"
    assert from_csv["image_id"].str.fullmatch(pattern).all()
    parts = from_csv["image_id"].str.split("/", expand=True)
    assert (parts[0] == from_csv["official_split"]).all()
    assert (parts[1] == from_csv["body_part"]).all()
    assert (parts[2] == from_csv["patient_id"]).all()
    assert (parts[3].str.split("_").str[0] == from_csv["study"]).all()
    assert (parts[3].str.endswith("_positive").astype(int) == from_csv["label"]).all()
    assert from_csv["source_path"].map(os.path.exists).all()
    # the 4 highest patient numbers are the valid split
    valid_patients = sorted(from_csv.loc[from_csv["official_split"] == "valid", "patient_id"].unique())
    assert valid_patients == [f"patient{i:05d}" for i in range(12, 16)]
    assert from_csv["image_id"].is_monotonic_increasing


def test_mura_parent_folder_and_prefix(mura_root):
    """Root may be the MURA-v1.1 folder or its parent; CSV paths keep their MURA-v1.1/ prefix."""
    a = build_mura_manifest(mura_root)
    b = build_mura_manifest(mura_root / "MURA-v1.1")
    assert (a["image_id"] == b["image_id"]).all()
    first = (mura_root / "MURA-v1.1" / "train_image_paths.csv").read_text().splitlines()[0]
    assert first.startswith("MURA-v1.1/train/")
    assert a.loc[a["image_id"] == first[len("MURA-v1.1/"):-4], "source_path"].map(os.path.exists).all()


def test_mura_labeled_studies_conflict(tmp_path):
    write_mura_csvs(tmp_path, n_images=12, n_patients=4, n_studies=6, n_valid_patients=1, seed=0)
    studies = tmp_path / "MURA-v1.1" / "train_labeled_studies.csv"
    lines = studies.read_text().splitlines()
    path, label = lines[0].rsplit(",", 1)
    lines[0] = f"{path},{1 - int(label)}"
    studies.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="contradicts the folder") as err:
        build_mura_manifest(tmp_path, check_files=False)
    assert path.replace("MURA-v1.1/", "").rstrip("/") in str(err.value)


def test_mura_bad_path_and_missing_files(tmp_path):
    write_mura_csvs(tmp_path, n_images=12, n_patients=4, n_studies=6, n_valid_patients=1, seed=0)
    with pytest.raises(DataError, match="12 missing files"):
        build_mura_manifest(tmp_path)  # CSV mode checks the files, which were not written
    paths = tmp_path / "MURA-v1.1" / "valid_image_paths.csv"
    paths.write_text(paths.read_text() + "MURA-v1.1/valid/XR_KNEE/p1/s1/img.jpg\n")
    with pytest.raises(DataError, match=r"1 paths not in the MURA layout.*XR_KNEE/p1"):
        build_mura_manifest(tmp_path, check_files=False)


def test_mura_phantom_tree_labels_match_truth(tmp_path):
    """Contract with salad_med.synthetic.phantom.write_mura_tree: every image found, label = ground truth."""
    from salad_med.synthetic.phantom import write_mura_tree

    truth = write_mura_tree(tmp_path, n_patients=5, seed=1, size=(128, 104))
    df = build_mura_manifest(tmp_path)
    assert len(df) == len(truth)
    labels = truth.set_index(truth["source_path"].map(os.path.realpath))["label"]
    got = df.set_index(df["source_path"].map(os.path.realpath))["label"]
    assert (got.sort_index() == labels.sort_index().astype(int)).all()


# ---------------------------------------------------------------------------------------- NIH
_DATA_ENTRY = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,
00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,
00000003_001.png,No Finding,1,3,74,F,AP,2500,2048,0.168,0.168,
"""


@pytest.fixture()
def nih_root(tmp_path) -> Path:
    (tmp_path / "Data_Entry_2017.csv").write_text(_DATA_ENTRY)
    for i, name in enumerate(["00000001_000", "00000001_001", "00000002_000", "00000003_000", "00000003_001"]):
        folder = tmp_path / f"images_00{1 + i % 2}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.png").touch()
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n00000003_001.png\n")
    return tmp_path


def test_nih_manifest(nih_root):
    df = build_nih_manifest(nih_root / "Data_Entry_2017.csv", train_val_list=nih_root / "train_val_list.txt",
                            test_list=nih_root / "test_list.txt")
    assert list(df["image_id"]) == ["00000001_000", "00000001_001", "00000002_000", "00000003_000", "00000003_001"]
    assert list(df["label"]) == [1, 1, 0, 1, 0]
    assert list(df["patient_id"]) == ["00000001", "00000001", "00000002", "00000003", "00000003"]
    assert list(df["study"]) == ["000", "001", "000", "000", "001"]
    assert (df["body_part"] == "CHEST").all()
    assert list(df["official_split"]) == ["train_val"] * 3 + ["test"] * 2
    assert list(df["patient_sex"]) == ["M", "M", "M", "F", "F"]
    assert df.loc[1, "finding_labels"] == "Cardiomegaly|Emphysema"
    assert df["source_path"].str.contains("/images_00[12]/images/").all()
    assert df["source_path"].map(os.path.exists).all()


def test_nih_errors(nih_root):
    csv = nih_root / "Data_Entry_2017.csv"
    (nih_root / "images_002" / "images" / "00000001_001.png").unlink()
    with pytest.raises(DataError, match=r"1 missing files: .*00000001_001\.png"):
        build_nih_manifest(csv)
    assert len(build_nih_manifest(csv, check_files=False)) == 5
    (nih_root / "test_list.txt").write_text("00000002_000.png\n")
    with pytest.raises(DataError, match="1 images in both official lists: 00000002_000.png"):
        build_nih_manifest(csv, train_val_list=nih_root / "train_val_list.txt", test_list=nih_root / "test_list.txt",
                           check_files=False)
    csv.write_text(_DATA_ENTRY.replace("Hernia", "Hernia|Broken_Heart"))
    with pytest.raises(DataError, match="unknown findings.*Broken_Heart"):
        build_nih_manifest(csv, check_files=False)


# ------------------------------------------------------------------------------------- folder
def test_folder_tree(tmp_path):
    for rel in ["normal/a.png", "normal/sub/b.jpg", "abnormal/c.dcm", "abnormal/notes.txt", "abnormal/.hidden.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    df = build_folder_manifest(tmp_path, body_part="hand")
    assert list(df["image_id"]) == ["abnormal/c", "normal/a", "normal/sub/b"]
    assert list(df["label"]) == [1, 0, 0]
    assert (df["patient_id"] == df["image_id"]).all()
    assert (df["body_part"] == "hand").all()


def test_folder_csv_aliases_and_errors(tmp_path):
    for name in ("x1.png", "x2.png", "x3.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).touch()
    (tmp_path / "labels.csv").write_text(
        "image,label,patient_or_image_id,body_part,source_path,note\n"
        "img/x1.png,normal,P1,hand,orig/x1,a\nimg/x2.png,ABNORMAL,P1,hand,orig/x2,b\nimg/x3.png,1,P2,leg,orig/x3,c\n")
    df = build_folder_manifest(tmp_path)  # labels.csv found in the folder
    assert list(df["label"]) == [0, 1, 1]
    assert list(df["patient_id"]) == ["P1", "P1", "P2"]
    assert list(df["csv_source_path"]) == ["orig/x1", "orig/x2", "orig/x3"]  # clashing name kept, renamed
    assert list(df["note"]) == ["a", "b", "c"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimg/x1.png,maybe\nimg/x2.png,2\nimg/gone.png,0\n")
    with pytest.raises(DataError, match=r"2 unknown label values.*2, maybe"):
        build_folder_manifest(tmp_path, bad)
    bad.write_text("path,label\nimg/x1.png,0\nimg/x1.png,1\nimg/gone.png,0\n")
    with pytest.raises(DataError) as err:
        build_folder_manifest(tmp_path, bad)
    assert "1 duplicate image_id: img/x1" in str(err.value) and "img/gone.png" in str(err.value)


def test_duplicate_image_id_names_both_files(tmp_path):
    """x.png + x.jpg in one folder give one image_id; the error names both files (issue 11.7)."""
    for suffix in (".png", ".jpg"):
        path = tmp_path / "normal" / f"x{suffix}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "y.png")
    with pytest.raises(DataError) as err:
        build_folder_manifest(tmp_path)
    text = str(err.value)
    assert "1 duplicate image_id: normal/x (files " in text
    assert str(tmp_path / "normal" / "x.jpg") in text and str(tmp_path / "normal" / "x.png") in text
    assert "y.png" not in text


def test_parse_labels():
    got = parse_labels(pd.Series(["0", "1", "-1", "Normal", "abnormal", "positive", "negative", "", "1.0"]))
    assert list(got) == [0, 1, -1, 0, 1, 1, 0, -1, 1]


def test_msk_sample(msk_sample):
    df = build_folder_manifest(msk_sample)
    assert len(df) == 300 and (df["label"] == 1).sum() == 150
    assert (df["patient_id"] == df["image_id"].str.rsplit("/", n=1).str[-1]).all()  # image ids as patients
    counts = df.groupby("body_part")["label"].agg(["size", "sum"])
    assert counts.loc["hand"].tolist() == [124, 62] and counts.loc["leg"].tolist() == [80, 40]
    assert df["source_path"].map(os.path.exists).all()


def test_cxr_sample(cxr_sample):
    df = build_folder_manifest(cxr_sample, cxr_sample / "labels.csv", body_part="CHEST")
    assert len(df) == 723 and df["patient_id"].nunique() == 205
    assert (df["label"] == 0).sum() == 326 and (df["label"] == 1).sum() == 397
    assert df["patient_id"].str.fullmatch(r"\d{8}").all()  # leading zeros kept
    assert (df["image_id"].str[len("images/"):len("images/") + 8] == df["patient_id"]).all()


# -------------------------------------------------------------------------------------- DICOM
def test_dicom_tree_and_labels(tmp_path):
    from salad_med.synthetic.phantom import write_dicom_tree

    truth = write_dicom_tree(tmp_path, n=4, seed=0, size=(128, 104))
    (tmp_path / "README").write_text("not a DICOM file")
    df = build_dicom_manifest(tmp_path)
    assert len(df) == 4 and (df["label"] == -1).all()
    assert set(df["sop_instance_uid"]) == set(truth["sop_instance_uid"])
    assert set(df["patient_id"]) == set(truth["patient_id"])
    assert df["body_part"].str.len().gt(0).all() and df["modality"].isin(["CR", "DX"]).all()
    import pydicom

    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in df["source_path"]}
    assert not any(name and name in cell for name in names for cell in df.astype(str).to_numpy().ravel())
    # labels keyed by SOP Instance UID (one left unlabelled) ...
    uids = sorted(df["sop_instance_uid"])
    (tmp_path / "by_uid.csv").write_text(f"sop_instance_uid,label\n{uids[0]},1\n{uids[1]},normal\n{uids[2]},0\n")
    got = build_dicom_manifest(tmp_path, tmp_path / "by_uid.csv").set_index("sop_instance_uid")["label"]
    assert [got[u] for u in uids] == [1, 0, 0, -1]
    # ... or by path relative to the root
    rel = os.path.relpath(df["source_path"][0], tmp_path)
    (tmp_path / "by_path.csv").write_text(f"path,label\n{rel},abnormal\n")
    got = build_dicom_manifest(tmp_path, tmp_path / "by_path.csv")
    assert list(got["label"]) == [1, -1, -1, -1]


def test_dicom_sample(dicom_sample):
    df = build_dicom_manifest(dicom_sample)
    assert len(df) == 11  # index.csv skipped
    row = df.set_index("image_id").loc["RG2_JPLL"]
    assert (row["patient_id"], row["body_part"], row["modality"]) == ("10RG2", "HIP", "CR")
    assert df.set_index("image_id").loc["vlut_04", "body_part"] == "UNKNOWN"
    assert df.set_index("image_id").loc["JPEG2KLossless_1s_1f_u_16_16", "patient_id"].startswith("unknown-")


# ------------------------------------------------------------------------------- load/validate
def _manifest(n: int = 4, **extra) -> pd.DataFrame:
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "source_path": [f"f{k}.png" for k in range(n)],
                       "patient_id": ["00000007", "NA", "p2", "p2"][:n], "body_part": "hand", "study": "",
                       "label": [0, 1, 0, -1][:n]})
    return df.assign(**extra)


def test_load_roundtrip_keeps_strings(tmp_path):
    df = _manifest(mask_fraction=[0.5, float("nan"), 0.25, 1 / 3])
    path = write_manifest(validate_manifest(df, check_files=False), tmp_path / "m.csv")
    back = load_manifest(path, check_files=False)
    assert list(back["patient_id"]) == ["00000007", "NA", "p2", "p2"]
    assert list(back["study"]) == ["", "", "", ""]
    assert back["label"].dtype == "int64" and list(back["label"]) == [0, 1, 0, -1]
    assert back["mask_fraction"].isna().tolist() == [False, True, False, False]
    assert path.read_text().splitlines()[4].endswith(",0.3333333333")  # fixed float format


def test_load_reports_every_problem(tmp_path, monkeypatch):
    df = _manifest()
    df.loc[3, "image_id"] = "i1"
    df.loc[0, "label"] = 7
    (tmp_path / "f2.png").touch()
    write_manifest(df, tmp_path / "bad.csv")
    monkeypatch.chdir(tmp_path)  # relative source paths are relative to the working directory
    with pytest.raises(DataError) as err:
        load_manifest(tmp_path / "bad.csv")
    text = str(err.value)
    assert "labels not in {-1, 0, 1}: i0=7" in text
    assert "1 duplicate image_id: i1" in text
    assert "3 missing files: f0.png, f1.png, f3.png" in text
    df.drop(columns="label").to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(DataError, match="missing required column"):
        load_manifest(tmp_path / "nolabel.csv", check_files=False)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "absent.csv")


def test_output_path_preferred_for_file_check(tmp_path):
    (tmp_path / "out0.png").touch()
    df = _manifest(1, output_path=[str(tmp_path / "out0.png")])
    assert len(validate_manifest(df)) == 1  # source f0.png is gone but the preprocessed file exists


# -------------------------------------------------------------------------------------- shards
def _write_shards(folder: Path, n: int, base: int = 1, skip: int | None = None) -> None:
    df = validate_manifest(_manifest(4), check_files=False)
    for j, i in enumerate(range(base, base + n)):
        if i == skip:
            continue
        shard = df.iloc[[j]].copy()
        write_manifest(shard, folder / shard_file_name(i, n))
        if i == base:
            (folder / shard_file_name(i, n, "failures")).write_text("source_path,reason\nbroken.png,truncated PNG\n")


def test_merge_shards(tmp_path):
    _write_shards(tmp_path, 4)
    merged, failures = merge_shards([tmp_path])
    assert list(merged["image_id"]) == ["i0", "i1", "i2", "i3"]
    assert failures[["source_path", "reason", "shard"]].values.tolist() == [["broken.png", "truncated PNG", "1/4"]]
    assert [i for i, _, _ in find_shards([tmp_path])] == [1, 2, 3, 4]
    zero = tmp_path / "zero"
    zero.mkdir()
    _write_shards(zero, 4, base=0)
    assert len(merge_manifests([zero])) == 4


def test_merge_refuses_gaps_and_overlaps(tmp_path):
    _write_shards(tmp_path, 4, skip=3)
    with pytest.raises(DataError, match=r"missing manifest\.shard-3-of-4\.csv"):
        merge_shards([tmp_path])
    other = tmp_path / "other"
    other.mkdir()
    write_manifest(validate_manifest(_manifest(4), check_files=False).iloc[[1]], other / shard_file_name(3, 4))
    with pytest.raises(DataError, match="1 image_id in several shards: i1"):
        merge_shards([tmp_path, other])
    (other / shard_file_name(3, 4, "failures")).write_text("source_path,reason\nbroken.png,unreadable\n")
    with pytest.raises(DataError, match="failed inputs also recorded by another shard: broken.png"):
        merge_shards([tmp_path, other])


def test_manifest_cli(tmp_path, mura_root):
    out = tmp_path / "m.csv"
    result = runner.invoke(app, ["manifest", "build", "mura", str(mura_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 images, 15 patients" in result.output
    assert load_manifest(out).equals(build_mura_manifest(mura_root))
    result = runner.invoke(app, ["manifest", "check", str(out)])
    assert result.exit_code == 0 and result.output.startswith("ok ")
    result = runner.invoke(app, ["manifest", "build", "knee", str(mura_root), "--out", str(out)])
    assert result.exit_code == 2 and "unknown dataset" in result.output
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shards(shards, 2, skip=2)
    result = runner.invoke(app, ["manifest", "merge", str(shards), "--out", str(tmp_path / "merged.csv")])
    assert result.exit_code == 1 and "manifest.shard-2-of-2.csv" in result.output
    _write_shards(shards, 2)
    result = runner.invoke(app, ["manifest", "merge", str(shards), "--out", str(tmp_path / "merged.csv")])
    assert result.exit_code == 0, result.output
    assert len(load_manifest(tmp_path / "merged.csv", check_files=False)) == 2
    assert (tmp_path / "failures.csv").read_text().startswith("source_path,reason,shard\nbroken.png")
