"""Split invariants (hypothesis over random manifests), hand-checked cases and real data (salad_med.data.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salad_med.data.manifests import build_folder_manifest
from salad_med.data.splits import (
    SPLITS,
    apply_split_list,
    check_split,
    make_split,
    round_half_up,
    split_summary,
    split_to_csv,
    split_totals,
)
from salad_med.errors import ConfigError, DataError

BODY_PARTS = ("XR_ELBOW", "XR_HAND", "XR_WRIST")
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _manifest(groups: list[tuple[int, str, str, int]]) -> pd.DataFrame:
    """Rows of ``(patient, body_part, kind, n_images)`` groups; mixed = first image normal, rest abnormal."""
    rows = []
    for patient, body, kind, n in groups:
        for k in range(n):
            label = {"normal": 0, "abnormal": 1}.get(kind, int(k > 0))
            image_id = f"p{patient:03d}/{body}/img{k}"
            rows.append((image_id, f"{image_id}.png", f"p{patient:03d}", body, "study1", label))
    return pd.DataFrame(rows, columns=["image_id", "source_path", "patient_id", "body_part", "study", "label"])


group_specs = st.lists(
    st.tuples(st.integers(0, 14), st.sampled_from(BODY_PARTS), st.sampled_from(["normal"] * 4 + ["abnormal", "mixed"]),
              st.integers(1, 3)),
    min_size=6, max_size=45, unique_by=lambda g: (g[0], g[1]),
)


def _groups(df: pd.DataFrame, group: str) -> pd.Series:
    """Group key recomputed independently of the library."""
    return df["patient_id"] + ("/" + df["body_part"] if group == "patient_bodypart" else "")


def _group_frame(df: pd.DataFrame, group: str) -> pd.DataFrame:
    key = _groups(df, group)
    g = df.assign(key=key).groupby("key")
    label = g["label"].max()
    body = g["body_part"].agg(lambda s: sorted(s.value_counts().loc[lambda c: c == c.max()].index)[0])
    return pd.DataFrame({"label": label, "body": body})


@_SETTINGS
@given(spec=group_specs, ar=st.sampled_from([0.0, 0.05, 0.1, 0.15, 0.3]),
       tf=st.sampled_from([0.2, 0.5, 0.7]), group=st.sampled_from(["patient_bodypart", "patient"]),
       seed=st.integers(0, 2**32 - 1))
def test_split_invariants(spec, ar, tf, group, seed):
    df = _manifest(spec)
    groups = _group_frame(df, group)
    n = len(groups)
    n_train = round_half_up(tf * n)
    n_abn = round_half_up(ar * n_train)
    feasible = (n_train > 0 and n_abn <= (groups["label"] == 1).sum()
                and n_train - n_abn <= (groups["label"] == 0).sum() and n - n_train >= 2)
    if not feasible:
        with pytest.raises(DataError):
            make_split(df, ar, tf, group, seed)
        return
    out = make_split(df, ar, tf, group, seed)
    # every input row exactly once, unchanged, sorted by image_id
    assert sorted(out["image_id"]) == list(out["image_id"]) == sorted(df["image_id"])
    merged = out.merge(df, on="image_id", suffixes=("", "_in"))
    for col in ("source_path", "patient_id", "body_part", "label"):
        assert (merged[col] == merged[f"{col}_in"]).all()
    # no group in two splits
    split_of = out.assign(key=_groups(out, group)).groupby("key")["split"].agg(set)
    assert split_of.map(len).eq(1).all()
    groups["split"] = split_of.map(lambda s: next(iter(s)))
    train = groups[groups["split"] == "train"]
    # train size and anomalous ratio within one group
    assert len(train) == n_train
    assert abs(train["label"].sum() - ar * len(train)) <= 0.5 + 1e-9
    if ar == 0:
        assert (out.loc[out["split"] == "train", "label"] == 0).all()
    # val/test balanced per stratum (label x body part) and overall
    rest = groups[groups["split"] != "train"]
    per = rest.groupby(["label", "body", "split"]).size().unstack(fill_value=0).reindex(columns=["val", "test"],
                                                                                       fill_value=0)
    assert (per["val"] - per["test"]).abs().max() <= 1
    assert abs(int(per["val"].sum()) - int(per["test"].sum())) <= 1
    # known anomalies = abnormal rows of train
    assert (out["known_anomaly"] == ((out["split"] == "train") & (out["label"] == 1))).all()
    check_split(out)
    # same seed, any row order -> identical bytes
    shuffled = df.sample(frac=1.0, random_state=seed % 1000).reset_index(drop=True)
    assert split_to_csv(make_split(shuffled, ar, tf, group, seed)) == split_to_csv(out)


@settings(max_examples=15, deadline=None)
@given(n_normal=st.integers(30, 60), n_abnormal=st.integers(10, 30), seeds=st.lists(
    st.integers(0, 2**32 - 1), min_size=2, max_size=2, unique=True))
def test_different_seed_different_split(n_normal, n_abnormal, seeds):
    spec = [(i, "XR_HAND", "normal", 1) for i in range(n_normal)]
    spec += [(i, "XR_WRIST", "abnormal", 2) for i in range(n_abnormal)]
    df = _manifest(spec)
    a, b = (make_split(df, 0.1, 0.5, "patient_bodypart", s) for s in seeds)
    assert not a["split"].equals(b["split"])
    assert (a["split"] == "train").sum() > 0 and (b["split"] == "train").sum() > 0


def test_hand_computed_split():
    """10 normal + 6 abnormal + 4 mixed groups, AR 0.1, half in train: 10 train groups, 1 abnormal."""
    spec = [(i, "XR_HAND", "normal", 1) for i in range(10)]
    spec += [(i, "XR_WRIST", "abnormal", 1) for i in range(6)]
    spec += [(i + 20, "XR_WRIST", "mixed", 2) for i in range(4)]
    out = make_split(_manifest(spec), anomalous_ratio=0.1, train_fraction=0.5, group="patient_bodypart", seed=7)
    totals = split_totals(out).set_index("split")
    assert totals.loc["train", ["groups", "normal_groups"]].tolist() == [10, 9]
    assert totals.loc["train", "abnormal_groups"] + totals.loc["train", "mixed_groups"] == 1
    assert totals.loc["train", "abnormal_group_fraction"] == pytest.approx(0.1)
    # rest: 1 normal (XR_HAND) + 9 abnormal/mixed (XR_WRIST) -> strata sizes 1 and 9, both odd:
    # their odd groups go to different splits, so val and test get 5 groups each
    assert totals.loc["val", "groups"] == totals.loc["test", "groups"] == 5
    assert totals["images"].sum() == 24
    summary = split_summary(out)
    assert summary["images"].sum() == 24
    assert list(summary["split"].drop_duplicates()) == list(SPLITS)


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 0.05 * 150, 0.1 * 25, 0.15 * 10, 2.4999)] == [1, 2, 3, 8, 3, 2, 2]


def test_impossible_requests_are_clear_errors():
    df = _manifest([(i, "XR_HAND", "normal", 1) for i in range(8)] + [(9, "XR_HAND", "abnormal", 1)])
    assert make_split(df, 0.15, 0.5)["known_anomaly"].sum() == 1  # round(0.15 * 5) = 1 abnormal group
    with pytest.raises(DataError, match=r"needs 2 abnormal of 5 train groups.*9 groups \(8 normal, 1 abnormal"):
        make_split(df, 0.3, 0.5)
    with pytest.raises(DataError, match="needs 1 abnormal"):
        make_split(df.iloc[:8], 0.2, 0.5)
    with pytest.raises(DataError, match="needs 16 normal train groups"):
        make_split(_manifest([(i, "XR_HAND", "normal", 1) for i in range(12)]
                             + [(i, "XR_HAND", "abnormal", 1) for i in range(20, 40)]), 0.0, 0.5)
    with pytest.raises(DataError, match="empty manifest"):
        make_split(df.iloc[:0], 0.05, 0.5)
    with pytest.raises(DataError, match="leaves 1 of"):
        make_split(df, 0.0, 0.9)
    unlabelled = df.assign(label=[0] * 8 + [-1])
    with pytest.raises(DataError, match="1 unlabelled images: p009/XR_HAND/img0"):
        make_split(unlabelled, 0.0, 0.5)
    for kwargs in ({"anomalous_ratio": 1.0}, {"train_fraction": 0.0}, {"group": "study"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            make_split(df, **{"anomalous_ratio": 0.0, **kwargs})


def test_split_list(tmp_path):
    df = _manifest([(0, "XR_HAND", "normal", 2), (1, "XR_HAND", "abnormal", 1), (2, "XR_WRIST", "normal", 1)])
    df["source_path"] = "/data/nih/images_001/images/" + df["image_id"].str.replace("/", "_") + ".png"
    listing = pd.DataFrame({"image_id": df["image_id"], "split": ["Train", "train", "valid", "TEST"]})
    out = apply_split_list(df, listing, group="patient")
    assert out.set_index("image_id")["split"].tolist() == ["train", "train", "val", "test"]
    assert out["known_anomaly"].sum() == 0
    # by bare file name (lists distributed without folders) from a CSV
    names = df["source_path"].str.rsplit("/", n=1).str[-1]
    path = tmp_path / "list.csv"
    pd.DataFrame({"path": names, "split": ["train", "train", "train", "test"]}).to_csv(path, index=False)
    assert apply_split_list(df, path)["known_anomaly"].sum() == 1
    # a patient split across train and test is a leak; an unassigned row is an error
    leak = pd.DataFrame({"image_id": df["image_id"], "split": ["train", "test", "val", "test"]})
    with pytest.raises(DataError, match=r"1 groups \(patient\) in more than one split: p000"):
        apply_split_list(df, leak, group="patient")
    with pytest.raises(DataError, match="1 manifest images not assigned by the split list: p002/XR_WRIST/img0"):
        apply_split_list(df, listing.iloc[:3])
    with pytest.raises(DataError, match="unknown split values"):
        apply_split_list(df, listing.assign(split="holdout"))


def test_check_split_detects_leak_and_bad_flags():
    out = make_split(_manifest([(i, "XR_HAND", "normal", 2) for i in range(10)]
                               + [(i, "XR_HAND", "abnormal", 1) for i in range(10, 14)]), 0.2, 0.5)
    leak = out.copy()
    leak.loc[leak["image_id"] == "p000/XR_HAND/img1", "split"] = (
        "val" if out.loc[0, "split"] != "val" else "test")
    with pytest.raises(DataError, match="groups in more than one split"):
        check_split(leak)
    flags = out.assign(known_anomaly=False)
    with pytest.raises(DataError, match="known_anomaly"):
        check_split(flags)


def test_real_cxr_patient_split(cxr_sample):
    df = build_folder_manifest(cxr_sample, cxr_sample / "labels.csv", body_part="CHEST")
    # 205 patients: 93 normal, 59 abnormal, 53 mixed -> half of them in train needs 98 normal groups
    with pytest.raises(DataError, match=r"needs 98 normal train groups.*205 groups \(93 normal, 59 abnormal, 53 mixed"):
        make_split(df, 0.05, 0.5, "patient", 0)
    out = make_split(df, 0.05, 0.4, "patient", 0)
    totals = split_totals(out).set_index("split")
    assert totals.loc["train", "groups"] == 82 and totals.loc["train", "normal_groups"] == 78
    assert totals["groups"].sum() == 205 and totals["images"].sum() == 723
    assert abs(totals.loc["val", "groups"] - totals.loc["test", "groups"]) <= 1
    assert out.groupby("patient_id")["split"].nunique().max() == 1


def test_real_msk_image_groups(msk_sample):
    df = build_folder_manifest(msk_sample)
    out = make_split(df, 0.05, 0.5, "patient_bodypart", 3)
    assert out["group_id"].nunique() == 300  # FracAtlas: every image its own group
    totals = split_totals(out).set_index("split")
    assert totals.loc["train", ["groups", "normal_groups", "abnormal_groups"]].tolist() == [150, 142, 8]
    assert totals.loc["val", "groups"] == totals.loc["test", "groups"] == 75
    per = (out[out["split"] != "train"].groupby(["label", "body_part", "split"]).size()
           .unstack(fill_value=0))
    assert (per["val"] - per["test"]).abs().max() <= 1
    assert np.isclose(out["known_anomaly"].sum(), 8)
