"""Leak-free SALAD splits: patient × body-part groups, a known anomalous ratio in train.

SALAD (Bozorgtabar et al., MICCAI 2020, arXiv:2010.09856, Sec. 3) splits MURA by patient × body
part, puts 50 % of the groups in train, of which 95 % (90 %, 85 %) normal and AR = 5 % (10 %, 15 %)
abnormal, and divides the rest equally between validation and test. The official code ships no
split; this module makes it a reproducible pandas manifest. The exact rule is :data:`SPLIT_RULE`.

Example:
    >>> df = load_manifest("manifest.csv")
    >>> split = make_split(df, anomalous_ratio=0.05, train_fraction=0.5, group="patient_bodypart", seed=0)
    >>> write_split(split, "data_manifests/mura_ar05_seed0.csv", parameters={...})

See Also:
    :mod:`salad_med.data.manifests` (the manifest schema), ``salad-med split --help``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.atomic import atomic_write_text
from salad_med.data.manifests import (
    format_listing,
    manifest_to_csv,
    pick_column,
    read_user_csv,
    validate_manifest,
)
from salad_med.errors import ConfigError, DataError
from salad_med.log import get_logger

__all__ = [
    "SPLITS",
    "GROUPINGS",
    "SPLIT_RULE",
    "round_half_up",
    "group_ids",
    "group_table",
    "split_counts",
    "make_split",
    "apply_split_list",
    "check_split",
    "split_summary",
    "split_totals",
    "split_to_csv",
    "sidecar_path",
    "write_split",
]

log = get_logger("splits")

SPLITS = ("train", "val", "test")
GROUPINGS = ("patient_bodypart", "patient")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
_SPLIT_COLUMNS = ("split", "group_id", "known_anomaly")

#: The split rule, verbatim in ``salad-med split --help`` and ``data_manifests/README.md``.
SPLIT_RULE = """\
1. Groups: patient_id|body_part (--group patient_bodypart, MURA default)
   or patient_id (--group patient, NIH default). A group is normal (all
   labels 0), abnormal (all 1) or mixed (both); mixed counts as abnormal.
   Unknown labels (-1) are refused.
2. Train: n_train = round(train_fraction x n_groups) groups, of which
   n_abn = round(anomalous_ratio x n_train) are abnormal groups and
   n_train - n_abn normal groups (round = half up). Groups are sorted by
   group_id; the normal and the abnormal groups are each permuted by
   numpy.random.default_rng(seed) and their first ones go to train.
3. Val/test: each remaining group (normal, abnormal or mixed) has a
   stratum label x body part (its most frequent body part, ties by
   name). The remaining groups are permuted by the same generator and,
   within each stratum (strata in sorted order), alternate val, test,
   val, ...: per stratum the counts differ by at most one group. The odd
   group of successive odd-sized strata goes alternately to val and test
   (the first to a seeded choice): the totals differ by at most one too.
4. Impossible requests are errors, never truncated: more abnormal or
   normal train groups than exist, an empty train, fewer than 2 groups
   left for val and test, an empty manifest.
5. Output: every input row exactly once, sorted by image_id, plus split
   (train|val|test), group_id and known_anomaly (abnormal rows of train,
   which the scorer drops from the memory bank)."""


def round_half_up(x: float) -> int:
    """Round half up, robust to float noise (``0.05 * 150 = 7.500000000000001`` → 8, ``2.5`` → 3)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _check_params(anomalous_ratio: float, train_fraction: float, group: str, seed: int) -> None:
    if group not in GROUPINGS:
        msg = f"group must be one of {', '.join(GROUPINGS)}, got {group!r}"
        raise ConfigError(msg)
    if not 0.0 <= anomalous_ratio < 1.0:
        msg = f"anomalous_ratio must be in [0, 1), got {anomalous_ratio}"
        raise ConfigError(msg)
    if not 0.0 < train_fraction < 1.0:
        msg = f"train_fraction must be in (0, 1), got {train_fraction}"
        raise ConfigError(msg)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise ConfigError(msg)


def group_ids(df: pd.DataFrame, group: str = "patient_bodypart") -> pd.Series:
    """``patient_id|body_part`` (``patient_bodypart``) or ``patient_id`` (``patient``) per row."""
    if group == "patient_bodypart":
        return df["patient_id"].astype(str) + "|" + df["body_part"].astype(str)
    if group == "patient":
        return df["patient_id"].astype(str)
    msg = f"group must be one of {', '.join(GROUPINGS)}, got {group!r}"
    raise ConfigError(msg)


def group_table(df: pd.DataFrame, gid: pd.Series | None = None) -> pd.DataFrame:
    """One row per group (index ``group_id``, sorted): ``label`` (0/1), ``kind``, ``stratum_body_part``, ``images``.

    ``kind`` is normal, abnormal or mixed (``label`` 1 for abnormal and mixed);
    ``stratum_body_part`` is the group's most frequent body part (ties: first by name).

    Args:
        df: manifest rows; uses ``group_id`` unless ``gid`` is given.
        gid: group id per row.
    """
    gid = df["group_id"] if gid is None else gid
    t = pd.DataFrame({"group_id": gid.to_numpy(), "label": df["label"].to_numpy(),
                      "body_part": df["body_part"].to_numpy()})
    agg = t.groupby("group_id", sort=True)["label"].agg(["min", "max", "size"])
    bp = (t.groupby(["group_id", "body_part"], sort=True).size().rename("n").reset_index()
          .sort_values(["group_id", "n", "body_part"], ascending=[True, False, True], kind="stable")
          .drop_duplicates("group_id").set_index("group_id")["body_part"])
    kind = np.where(agg["min"] == agg["max"], np.where(agg["max"] == 1, "abnormal", "normal"), "mixed")
    out = pd.DataFrame({"label": (agg["max"] == 1).astype("int64"), "kind": kind,
                        "stratum_body_part": bp.reindex(agg.index), "images": agg["size"]}, index=agg.index)
    out.index.name = "group_id"
    return out


def split_counts(n_groups: int, anomalous_ratio: float, train_fraction: float) -> tuple[int, int, int]:
    """``(n_train, n_train_abnormal, n_train_normal)`` groups for the rule in :data:`SPLIT_RULE`."""
    n_train = round_half_up(train_fraction * n_groups)
    n_abn = round_half_up(anomalous_ratio * n_train)
    return n_train, n_abn, n_train - n_abn


def _prepare(df: pd.DataFrame, group: str) -> pd.DataFrame:
    """Validated copy without old split columns and with ``group_id``; refuses empty/unlabelled data."""
    if len(df) == 0:
        msg = "cannot split an empty manifest"
        raise DataError(msg)
    df = validate_manifest(df.drop(columns=[c for c in _SPLIT_COLUMNS if c in df.columns]),
                           check_files=False, source="manifest")
    unknown = df["image_id"][df["label"] == -1]
    if len(unknown):
        msg = ("cannot split unlabelled images (label -1); label or drop them first: "
               + format_listing(list(unknown), "unlabelled images"))
        raise DataError(msg)
    df["group_id"] = group_ids(df, group)
    return df


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df["known_anomaly"] = (df["split"] == "train") & (df["label"] == 1)
    df = df[[c for c in df.columns if c not in _SPLIT_COLUMNS] + list(_SPLIT_COLUMNS)]
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    check_split(df)
    return df


def make_split(df: pd.DataFrame, anomalous_ratio: float = 0.05, train_fraction: float = 0.5,
               group: str = "patient_bodypart", seed: int = 0) -> pd.DataFrame:
    """Split a manifest into train/val/test by groups (the rule in :data:`SPLIT_RULE`).

    Args:
        df: a manifest (:mod:`salad_med.data.manifests`); an existing ``split``/``group_id``/``known_anomaly``
            is replaced.
        anomalous_ratio: AR, the abnormal fraction of the train groups, in [0, 1).
        train_fraction: fraction of all groups put in train, in (0, 1).
        group: ``patient_bodypart`` or ``patient``.
        seed: seed of ``numpy.random.default_rng``; the result depends only on the rows' content,
            not on their order.

    Returns:
        The rows of ``df`` sorted by ``image_id`` plus ``split``, ``group_id`` and ``known_anomaly``.

    Raises:
        ConfigError: a parameter out of range.
        DataError: empty manifest, unlabelled rows, too few abnormal or normal groups for the
            request, or too few groups left for val/test.
    """
    _check_params(anomalous_ratio, train_fraction, group, seed)
    df = _prepare(df, group)
    groups = group_table(df)
    n_groups = len(groups)
    n_train, n_abn, n_norm = split_counts(n_groups, anomalous_ratio, train_fraction)
    normal_ids = groups.index[groups["label"] == 0].to_numpy()
    abnormal_ids = groups.index[groups["label"] == 1].to_numpy()
    n_mixed = int((groups["kind"] == "mixed").sum())
    where = (f"{n_groups} groups ({len(normal_ids)} normal, {len(abnormal_ids) - n_mixed} abnormal, "
             f"{n_mixed} mixed; group={group})")
    if n_train == 0:
        msg = f"train_fraction {train_fraction} of {where} gives an empty train split"
        raise DataError(msg)
    if n_abn > len(abnormal_ids):
        msg = (f"anomalous_ratio {anomalous_ratio} needs {n_abn} abnormal of {n_train} train groups, but the "
               f"manifest has only {where}; lower --anomalous-ratio or --train-fraction")
        raise DataError(msg)
    if n_norm > len(normal_ids):
        msg = (f"train_fraction {train_fraction} with anomalous_ratio {anomalous_ratio} needs {n_norm} normal "
               f"train groups, but the manifest has only {where}; lower --train-fraction")
        raise DataError(msg)
    if n_groups - n_train < 2:
        msg = f"train_fraction {train_fraction} leaves {n_groups - n_train} of {where} for val and test (need >= 2)"
        raise DataError(msg)
    rng = np.random.default_rng(seed)
    train = np.concatenate([normal_ids[rng.permutation(len(normal_ids))[:n_norm]],
                            abnormal_ids[rng.permutation(len(abnormal_ids))[:n_abn]]])
    assign = pd.Series("", index=groups.index, dtype=object)
    assign[train] = "train"
    rest = groups.loc[assign == ""]
    rest = rest.iloc[rng.permutation(len(rest))]
    strata = list(zip(rest["label"], rest["stratum_body_part"], strict=True))
    rank = rest.groupby(["label", "stratum_body_part"], sort=False).cumcount().to_numpy()
    sizes = rest.groupby(["label", "stratum_body_part"], sort=True).size()
    flip, offset = int(rng.integers(2)), {}
    for key, size in sizes.items():
        offset[key] = flip
        if size % 2:
            flip ^= 1
    parity = (rank + np.array([offset[s] for s in strata], dtype=np.int64)) % 2
    assign[rest.index] = np.where(parity == 0, "val", "test")
    df["split"] = df["group_id"].map(assign).astype(str)
    return _finish(df)


def _normalise_split_values(values: pd.Series, where: str) -> pd.Series:
    out = values.astype(str).str.strip().str.lower().map(_SPLIT_ALIASES)
    bad = sorted(set(values[out.isna()]))
    if bad:
        msg = f"{where}: " + format_listing(bad, "unknown split values (expected train, val/valid, test)")
        raise DataError(msg)
    return out.astype(str)


def apply_split_list(df: pd.DataFrame, split_list: str | os.PathLike | pd.DataFrame,
                     group: str = "patient_bodypart") -> pd.DataFrame:
    """Apply a user assignment (``image_id,split`` or ``path,split``) and check the invariants.

    Paths match ``source_path`` exactly, else by file name when names are unique (so the NIH
    ``00000001_000.png`` lists of Tang et al. work on any folder layout). Split values
    ``train``/``val``/``valid``/``validation``/``test`` (any case).

    Raises:
        DataError: unknown split values, keys listed twice, manifest rows the list does not assign,
            or a group in two splits (a leak).
    """
    if group not in GROUPINGS:
        msg = f"group must be one of {', '.join(GROUPINGS)}, got {group!r}"
        raise ConfigError(msg)
    df = _prepare(df, group)
    if isinstance(split_list, pd.DataFrame):
        table, where = split_list.astype(str), "split list"
    else:
        table, where = read_user_csv(Path(split_list)), str(split_list)
    split_col = pick_column(table.columns, ("split", "set", "subset"))
    id_col = pick_column(table.columns, ("image_id",))
    path_col = pick_column(table.columns, ("path", "source_path", "image", "file", "filename", "image index"))
    if split_col is None or (id_col is None and path_col is None):
        msg = f"{where}: needs a split column and an image_id or path column (found: {', '.join(table.columns)})"
        raise DataError(msg)
    splits = _normalise_split_values(table[split_col], where)
    key_col = id_col or path_col
    keys = table[key_col].astype(str).str.strip()
    dup = keys[keys.duplicated()]
    if len(dup):
        msg = f"{where}: " + format_listing(sorted(set(dup)), f"{key_col} values listed twice")
        raise DataError(msg)
    mapping = pd.Series(splits.to_numpy(), index=keys.to_numpy())
    if id_col is not None:
        assigned = df["image_id"].map(mapping)
    else:
        assigned = df["source_path"].map(mapping)
        todo = assigned.isna()
        names = df["source_path"].str.rsplit("/", n=1).str[-1]
        list_names = keys.str.rsplit("/", n=1).str[-1]
        if todo.any() and not names.duplicated().any() and not list_names.duplicated().any():
            by_name = pd.Series(splits.to_numpy(), index=list_names.to_numpy())
            assigned = assigned.where(~todo, names.map(by_name))
    missing = df["image_id"][assigned.isna()]
    if len(missing):
        msg = f"{where}: " + format_listing(list(missing), "manifest images not assigned by the split list")
        raise DataError(msg)
    unused = len(keys) - int(assigned.notna().sum())
    if unused > 0:
        log.warning("%s: %d listed images are not in the manifest", where, unused)
    df["split"] = assigned.astype(str)
    per_group = df.groupby("group_id")["split"].nunique()
    leaks = per_group.index[per_group > 1]
    if len(leaks):
        msg = f"{where}: " + format_listing(sorted(leaks), f"groups ({group}) in more than one split")
        raise DataError(msg)
    return _finish(df)


def check_split(df: pd.DataFrame) -> None:
    """Check a split manifest: splits are train/val/test, unique image ids, each group in one split,
    ``known_anomaly`` == (train and label 1).

    Raises:
        DataError: naming the violated invariant.
    """
    for col in _SPLIT_COLUMNS:
        if col not in df.columns:
            msg = f"split manifest lacks the {col} column"
            raise DataError(msg)
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        msg = format_listing(bad, "unknown split values")
        raise DataError(msg)
    if df["image_id"].duplicated().any():
        msg = format_listing(sorted(set(df["image_id"][df["image_id"].duplicated()])), "duplicate image_id")
        raise DataError(msg)
    per_group = df.groupby("group_id")["split"].nunique()
    if (per_group > 1).any():
        msg = format_listing(sorted(per_group.index[per_group > 1]), "groups in more than one split")
        raise DataError(msg)
    expected = (df["split"] == "train") & (df["label"] == 1)
    if not (df["known_anomaly"].astype(bool) == expected).all():
        msg = "known_anomaly must be exactly the abnormal rows of train"
        raise DataError(msg)


def _split_order(frame: pd.DataFrame) -> pd.DataFrame:
    order = {s: i for i, s in enumerate(SPLITS)}
    return (frame.assign(_o=frame["split"].map(order)).sort_values(["_o", *frame.columns[1:3]], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Images and groups per split × label × body part (row labels; a mixed group counts under both)."""
    out = (df.groupby(["split", "label", "body_part"], sort=True)
           .agg(images=("image_id", "size"), groups=("group_id", "nunique")).reset_index())
    return _split_order(out)


def split_totals(df: pd.DataFrame) -> pd.DataFrame:
    """Per split: images, abnormal images, groups, normal/abnormal/mixed groups, abnormal group fraction."""
    groups = group_table(df)
    groups["split"] = df.drop_duplicates("group_id").set_index("group_id")["split"].reindex(groups.index)
    rows = []
    for split in SPLITS:
        g = groups[groups["split"] == split]
        d = df[df["split"] == split]
        n = len(g)
        rows.append({"split": split, "images": len(d), "abnormal_images": int((d["label"] == 1).sum()),
                     "groups": n, "normal_groups": int((g["kind"] == "normal").sum()),
                     "abnormal_groups": int((g["kind"] == "abnormal").sum()),
                     "mixed_groups": int((g["kind"] == "mixed").sum()),
                     "abnormal_group_fraction": round(float(g["label"].mean()) if n else 0.0, 6)})
    return pd.DataFrame(rows)


def split_to_csv(df: pd.DataFrame) -> str:
    """Canonical CSV text of a split manifest (rows sorted by ``image_id``; see ``manifest_to_csv``)."""
    return manifest_to_csv(df.sort_values("image_id", kind="stable"))


def sidecar_path(out: str | os.PathLike) -> Path:
    """The JSON record beside a split manifest: ``NAME.csv`` → ``NAME.csv.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def write_split(df: pd.DataFrame, out: str | os.PathLike, parameters: dict[str, Any]) -> tuple[Path, Path]:
    """Write the split manifest and its JSON sidecar, both atomically.

    The sidecar holds ``parameters`` (every option, the seed, the input path and SHA-256...), the rule,
    the output's SHA-256 and the summary tables. It has no time stamp: same inputs give same bytes.

    Returns:
        ``(csv_path, json_path)``.
    """
    import hashlib

    from salad_med import __version__

    text = split_to_csv(df)
    record = {
        "salad_med_version": __version__,
        "parameters": parameters,
        "rule": SPLIT_RULE.splitlines(),
        "output": {"path": Path(out).name, "rows": len(df),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
        "totals": _records(split_totals(df)),
        "summary": _records(split_summary(df)),
    }
    csv_path = atomic_write_text(out, text)
    json_path = atomic_write_text(sidecar_path(out), json.dumps(record, indent=2) + "\n")
    return csv_path, json_path
