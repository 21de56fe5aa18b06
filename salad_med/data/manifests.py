"""Image manifests: one pandas row per image, one schema for MURA, NIH, folders and DICOM trees.

Core columns (every manifest):

==============  ======  ==================================================================
column          dtype   meaning
==============  ======  ==================================================================
``image_id``    str     unique, stable id (MURA: ``train/XR_WRIST/patient00001/study1_positive/image1``)
``source_path`` str     the original file (as built: relative paths are relative to the CWD)
``patient_id``  str     patient (``patient00001``; image id when the dataset has none)
``body_part``   str     ``XR_WRIST``, ``CHEST``, ``hand``, ``UNKNOWN``...
``study``       str     study within the patient (``study1``, follow-up ``000``, StudyInstanceUID)
``label``       int     0 normal, 1 abnormal, -1 unknown
==============  ======  ==================================================================

Optional: ``official_split`` (MURA ``train``/``valid``, NIH ``train_val``/``test``), the DICOM UIDs
(``sop_instance_uid``, ``study_instance_uid``, ``series_instance_uid``, ``modality``), the columns of
``salad-med preprocess`` (``output_path``, ``mask_path``, ``status``, ...) and of ``salad-med split``
(``split``, ``group_id``, ``known_anomaly``). Builders keep any other column of a user CSV.

Every manifest is validated on load (:func:`load_manifest`): required columns, dtypes, unique
``image_id`` and existing files; every problem is listed in one :class:`~salad_med.errors.DataError`,
nothing is silently dropped. Manifests are written canonically (:func:`manifest_to_csv`) and
atomically (:func:`write_manifest`).

Example:
    >>> df = build_mura_manifest("/data/MURA-v1.1")
    >>> write_manifest(df, "/data/mura_manifest.csv")
    >>> df = load_manifest("/data/mura_manifest.csv")
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from preprocessing.atomic import atomic_write_text
from salad_med.errors import ConfigError, DataError
from salad_med.log import get_logger, progress

__all__ = [
    "REQUIRED_COLUMNS",
    "STRING_COLUMNS",
    "NIH_FINDINGS",
    "MURA_BODY_PARTS",
    "IMAGE_SUFFIXES",
    "validate_manifest",
    "load_manifest",
    "manifest_to_csv",
    "write_manifest",
    "file_sha256",
    "parse_labels",
    "build_manifest",
    "build_mura_manifest",
    "build_nih_manifest",
    "build_folder_manifest",
    "build_dicom_manifest",
    "shard_file_name",
    "find_shards",
    "merge_shards",
    "merge_manifests",
    "format_listing",
    "pick_column",
    "read_user_csv",
]

log = get_logger("manifests")

#: Columns every manifest has, in this order.
REQUIRED_COLUMNS = ("image_id", "source_path", "patient_id", "body_part", "study", "label")
#: Columns always read and kept as strings ("" when empty; "NA" stays "NA").
STRING_COLUMNS = (
    "image_id", "source_path", "patient_id", "body_part", "study", "official_split",
    "sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality",
    "output_path", "mask_path", "status", "split", "group_id",
)
_OPTIONAL_ORDER = ("official_split", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality")
#: The 14 ChestX-ray14 findings; ``No Finding`` is normal, any of these is abnormal.
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
#: The seven MURA-v1.1 study types.
MURA_BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
#: File suffixes taken as images by the folder builder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
_NON_DICOM_SUFFIXES = frozenset({
    ".csv", ".txt", ".json", ".md", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
    ".gif", ".pdf", ".zip", ".gz", ".tar", ".py", ".html", ".xml", ".log", ".npy", ".npz", ".pt",
})
# the pandas default NA strings, applied to every non-string column on load
_NA_STRINGS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
               "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
_LABEL_WORDS = {"0": 0, "1": 1, "-1": -1, "normal": 0, "abnormal": 1, "negative": 0, "positive": 1,
                "unknown": -1, "": -1}
_MAX_LISTED = 20


def format_listing(items: Sequence[str], what: str) -> str:
    """``"3 duplicate image_id: a, b, c"`` with at most 20 items named."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in (*REQUIRED_COLUMNS, *_OPTIONAL_ORDER) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _row_files(df: pd.DataFrame) -> pd.Series:
    """The file each row stands for: ``output_path`` when present and non-empty, else ``source_path``."""
    files = df["source_path"]
    if "output_path" in df.columns:
        out = df["output_path"]
        files = out.where(out != "", files)
    return files


def validate_manifest(df: pd.DataFrame, *, check_files: bool = True, source: str = "manifest") -> pd.DataFrame:
    """Check a manifest and return a copy with canonical dtypes.

    Checks the required columns (:data:`REQUIRED_COLUMNS`), non-empty ``image_id``/``source_path``,
    labels in {-1, 0, 1}, unique ``image_id``, ``split`` values (when present) and, with
    ``check_files``, that each row's file exists (``output_path`` when present and non-empty,
    otherwise ``source_path``). All problems are reported together.

    Args:
        df: the manifest.
        check_files: check that the files exist.
        source: name used in the error message (usually the manifest path).

    Returns:
        A copy: string columns as ``str`` ("" for missing), ``label`` as int64,
        ``known_anomaly`` as bool, core columns first.

    Raises:
        DataError: listing every problem (duplicates and missing files by name, at most 20 each).
    """
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        msg = (f"{source}: missing required column(s) {', '.join(missing_cols)} "
               f"(found: {', '.join(map(str, df.columns))})")
        raise DataError(msg)
    df = df.copy()
    for col in STRING_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str)
    problems: list[str] = []
    for col in ("image_id", "source_path"):
        empty = df.index[df[col] == ""]
        if len(empty):
            problems.append(format_listing([f"row {i}" for i in empty], f"rows with an empty {col}"))
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = ~labels.isin([-1, 0, 1])
    if bad.any():
        bad_rows = df.loc[bad]
        problems.append(format_listing([f"{r.image_id}={r.label!r}" for r in bad_rows[["image_id", "label"]].itertuples()],
                                 "labels not in {-1, 0, 1}"))
    else:
        df["label"] = labels.astype("int64")
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():  # name every file of each clash: x.png + x.jpg give one image_id "x"
        files = df.loc[dup].groupby("image_id", sort=True)["source_path"].agg(lambda p: ", ".join(sorted(p)))
        problems.append(format_listing([f"{i} (files {f})" for i, f in files.items()], "duplicate image_id"))
    if "split" in df.columns:
        bad_split = sorted(set(df["split"]) - {"train", "val", "test"})
        if bad_split:
            problems.append(format_listing(bad_split, "unknown split values (expected train, val, test)"))
    if "known_anomaly" in df.columns:
        ka = df["known_anomaly"]
        if ka.dtype != bool:
            mapped = ka.astype(str).str.lower().map({"true": True, "false": False, "1": True, "0": False})
            if mapped.isna().any():
                problems.append("known_anomaly must be True/False")
            else:
                df["known_anomaly"] = mapped.astype(bool)
    if check_files:
        files = _row_files(df)
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            problems.append(format_listing(missing, "missing files"))
    if problems:
        msg = f"{source}: invalid manifest: " + "; ".join(problems)
        raise DataError(msg)
    return _order_columns(df).reset_index(drop=True)


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV (see :func:`validate_manifest`).

    String columns (:data:`STRING_COLUMNS`) are read verbatim (``"00000001"`` stays a string, an
    empty cell is ``""``); other columns get pandas' usual type inference.

    Raises:
        DataError: unreadable file or invalid manifest.
    """
    path = Path(path)
    try:
        header = pd.read_csv(path, nrows=0).columns
        str_cols = [c for c in header if c in STRING_COLUMNS]
        df = pd.read_csv(
            path,
            dtype=dict.fromkeys(str_cols, str),
            keep_default_na=False,
            na_values={c: _NA_STRINGS for c in header if c not in STRING_COLUMNS},
        )
    except FileNotFoundError:
        msg = f"{path}: manifest not found"
        raise DataError(msg) from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        msg = f"{path}: cannot read manifest: {err}"
        raise DataError(msg) from None
    return validate_manifest(df, check_files=check_files, source=str(path))


def manifest_to_csv(df: pd.DataFrame) -> str:
    """Canonical CSV text of a manifest: no index, ``\\n`` line ends, floats as ``%.10g``.

    The same frame always gives the same bytes (callers sort rows first).
    """
    return df.to_csv(index=False, lineterminator="\n", float_format="%.10g")


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write :func:`manifest_to_csv` of ``df`` to ``path`` atomically (temp file + rename)."""
    return atomic_write_text(path, manifest_to_csv(df))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_labels(values: pd.Series, source: str = "labels") -> pd.Series:
    """Map label cells to ints: 0/1/-1, ``normal``/``abnormal``, ``negative``/``positive``, ``unknown``/"" → -1.

    Raises:
        DataError: listing the values that are none of these.
    """
    text = values.fillna("").astype(str).str.strip().str.lower()
    out = text.map(_LABEL_WORDS)
    rest = out.isna()
    if rest.any():
        num = pd.to_numeric(text[rest], errors="coerce")
        ok = num.isin([-1, 0, 1])
        out.loc[num.index[ok]] = num[ok]
        bad = sorted(set(text[rest][~ok.to_numpy()]))
        if bad:
            msg = f"{source}: " + format_listing(bad, "unknown label values (use 0/1/-1 or normal/abnormal)")
            raise DataError(msg)
    return out.astype("int64")


def _infer_numeric(values: pd.Series) -> pd.Series:
    """A text column as numbers when every non-empty cell parses (as :func:`load_manifest` would read it)."""
    try:
        return pd.to_numeric(values.replace("", None))
    except (ValueError, TypeError):
        return values


def _strip_suffix(rel: pd.Series) -> pd.Series:
    return rel.str.replace(r"\.[^./]+$", "", regex=True)


def _join(root: Path, rel: pd.Series) -> pd.Series:
    """``root/rel`` for a whole column (absolute ``rel`` kept)."""
    rel = rel.astype(str)
    prefix = str(root).rstrip("/") + "/" if str(root) not in ("", ".") else ""
    return rel.where(rel.str.startswith("/"), prefix + rel)


def _walk_files(root: Path, suffixes: Iterable[str] | None = None) -> list[str]:
    """Sorted relative posix paths of the non-hidden files under ``root`` (optionally by suffix)."""
    wanted = {s.lower() for s in suffixes} if suffixes is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            if wanted is not None and os.path.splitext(name)[1].lower() not in wanted:
                continue
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(found)


# ----------------------------------------------------------------------------------------- MURA
_MURA_RE = (r"^(?P<official_split>train|valid)/(?P<body_part>XR_[A-Z]+)/(?P<patient_id>patient\d+)/"
            r"(?P<study>study\d+)_(?P<outcome>positive|negative)/(?P<image>[^/]+\.png)$")
_MURA_PREFIX_RE = r"^(?:\./)?(?:.*?/)?(?=(?:train|valid)/XR_)"


def _mura_root(root: Path) -> Path:
    if not (root / "train").is_dir() and not (root / "valid").is_dir() and (root / "MURA-v1.1").is_dir():
        return root / "MURA-v1.1"
    return root


def _read_lines_csv(path: Path, names: list[str]) -> pd.DataFrame:
    return pd.read_csv(path, header=None, names=names, dtype=str, keep_default_na=False)


def build_mura_manifest(root: str | os.PathLike, *, source: str = "auto", check_files: bool = True) -> pd.DataFrame:
    """Manifest of MURA-v1.1 (Rajpurkar et al. 2017) from its official CSVs or its folder tree.

    Layout: ``root/{train,valid}/XR_<BODYPART>/patient<ID>/study<N>_<positive|negative>/image<K>.png``
    and ``root/{train,valid}_image_paths.csv`` (+ ``*_labeled_studies.csv``). Paths in the official
    CSVs (``MURA-v1.1/train/...``) are taken relative to ``root``. The label is per study: from
    ``*_labeled_studies.csv`` when present (checked against the folder suffix), else the suffix.

    Args:
        root: the ``MURA-v1.1`` folder (or its parent).
        source: ``"csv"`` (official CSVs), ``"tree"`` (walk the folders) or ``"auto"`` (CSVs when present).
        check_files: check that every image exists (CSV mode; the tree mode finds only existing files).

    Returns:
        Manifest sorted by ``image_id``: ``image_id`` = ``train/XR_WRIST/patient00001/study1_positive/image1``,
        ``patient_id`` = ``patient00001``, ``body_part`` = ``XR_WRIST``, ``study`` = ``study1``,
        ``official_split`` = ``train``/``valid``.

    Raises:
        ConfigError: unknown ``source``.
        DataError: nothing found, paths not in the MURA layout, label conflicts, missing files.
    """
    if source not in ("auto", "csv", "tree"):
        msg = f"build_mura_manifest: source must be auto, csv or tree, got {source!r}"
        raise ConfigError(msg)
    root = _mura_root(Path(root))
    csvs = [root / f"{s}_image_paths.csv" for s in ("train", "valid") if (root / f"{s}_image_paths.csv").is_file()]
    use_csv = source == "csv" or (source == "auto" and csvs)
    if use_csv:
        if not csvs:
            msg = f"{root}: no train_image_paths.csv / valid_image_paths.csv"
            raise DataError(msg)
        paths = pd.concat([_read_lines_csv(p, ["path"])["path"] for p in csvs], ignore_index=True)
        where = ", ".join(str(p) for p in csvs)
    else:
        found = [p for sub in ("train", "valid") if (root / sub).is_dir()
                 for p in (f"{sub}/{r}" for r in _walk_files(root / sub, (".png",)))]
        paths = pd.Series(found, dtype=str)
        where = str(root)
        check_files = False
    if paths.empty:
        msg = f"{where}: no MURA images found"
        raise DataError(msg)
    rel = paths.astype(str).str.strip().str.replace(_MURA_PREFIX_RE, "", regex=True)
    parts = rel.str.extract(_MURA_RE)
    bad = parts["image"].isna()
    if bad.any():
        msg = f"{where}: " + format_listing(list(paths[bad]), "paths not in the MURA layout "
                                      "{train,valid}/XR_*/patient*/study*_{positive,negative}/image*.png")
        raise DataError(msg)
    label = (parts["outcome"] == "positive").astype("int64")
    if use_csv:
        label = _mura_study_labels(root, rel, label)
    df = pd.DataFrame({
        "image_id": _strip_suffix(rel),
        "source_path": _join(root, rel),
        "patient_id": parts["patient_id"],
        "body_part": parts["body_part"],
        "study": parts["study"],
        "label": label,
        "official_split": parts["official_split"],
    })
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df, check_files=check_files, source=where)


def _mura_study_labels(root: Path, rel: pd.Series, suffix_label: pd.Series) -> pd.Series:
    """Labels from ``*_labeled_studies.csv`` (study folder → 0/1), checked against the folder suffix."""
    files = [root / f"{s}_labeled_studies.csv" for s in ("train", "valid")
             if (root / f"{s}_labeled_studies.csv").is_file()]
    if not files:
        return suffix_label
    studies = pd.concat([_read_lines_csv(p, ["study_dir", "label"]) for p in files], ignore_index=True)
    keys = studies["study_dir"].str.strip().str.replace(_MURA_PREFIX_RE, "", regex=True).str.rstrip("/")
    mapping = pd.Series(parse_labels(studies["label"], ", ".join(map(str, files))).to_numpy(), index=keys)
    if mapping.index.duplicated().any():
        dup = sorted(set(mapping.index[mapping.index.duplicated()]))
        msg = f"{files[0].parent}: " + format_listing(dup, "studies listed twice in *_labeled_studies.csv")
        raise DataError(msg)
    study_dir = rel.str.replace(r"/[^/]+$", "", regex=True)
    label = study_dir.map(mapping)
    unlabeled = label.isna()
    label = label.where(~unlabeled, suffix_label).astype("int64")
    if unlabeled.any():
        log.warning("%d MURA images have no study in *_labeled_studies.csv; label from the folder suffix",
                    int(unlabeled.sum()))
    conflict = label != suffix_label
    if conflict.any():
        msg = f"{files[0].parent}: " + format_listing(sorted(set(study_dir[conflict])),
                                                "studies whose *_labeled_studies.csv label contradicts the folder")
        raise DataError(msg)
    return label


# ------------------------------------------------------------------------------------------ NIH
def _read_list(path: str | os.PathLike) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_nih_manifest(data_entry_csv: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                       train_val_list: str | os.PathLike | None = None, test_list: str | os.PathLike | None = None,
                       *, check_files: bool = True) -> pd.DataFrame:
    """Manifest of NIH ChestX-ray14 (Wang et al. 2017) from ``Data_Entry_2017.csv``.

    Normal = ``No Finding``; abnormal = one or more of the 14 findings (:data:`NIH_FINDINGS`,
    ``|``-separated). Images are looked up by name anywhere under ``images_dir`` (default: the CSV's
    folder, which covers the ``images_0XX/images/`` layout).

    Args:
        data_entry_csv: ``Data_Entry_2017.csv`` (Image Index, Finding Labels, Follow-up #, Patient ID,
            Patient Age, Patient Gender, View Position, ...).
        images_dir: folder searched recursively for the PNGs.
        train_val_list: official ``train_val_list.txt`` (→ ``official_split`` = ``train_val``).
        test_list: official ``test_list.txt`` (→ ``official_split`` = ``test``).
        check_files: check that every image was found.

    Returns:
        Manifest sorted by ``image_id`` (``00000001_000``): ``patient_id`` = 8-digit id,
        ``body_part`` = ``CHEST``, ``study`` = 3-digit follow-up, plus ``finding_labels``,
        ``follow_up``, ``patient_age``, ``patient_sex``, ``view_position`` (when in the CSV).

    Raises:
        DataError: missing columns, unknown findings, images in both official lists, missing files.
    """
    csv = Path(data_entry_csv)
    try:
        entry = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        msg = f"{csv}: cannot read: {err}"
        raise DataError(msg) from None
    entry.columns = [c.strip() for c in entry.columns]
    needed = ["Image Index", "Finding Labels", "Patient ID"]
    lacking = [c for c in needed if c not in entry.columns]
    if lacking:
        msg = f"{csv}: missing column(s) {', '.join(lacking)} (found: {', '.join(entry.columns)})"
        raise DataError(msg)
    findings = entry["Finding Labels"].str.strip()
    tokens = findings.str.split("|").explode().str.strip()
    unknown = sorted(set(tokens) - set(NIH_FINDINGS) - {"No Finding"})
    if unknown:
        msg = f"{csv}: " + format_listing(unknown, "unknown findings (expected 'No Finding' or the 14 NIH findings)")
        raise DataError(msg)
    mixed = findings.str.contains("No Finding", regex=False) & (findings != "No Finding")
    if mixed.any():
        msg = f"{csv}: " + format_listing(list(entry["Image Index"][mixed]), "images with 'No Finding' and a finding")
        raise DataError(msg)
    names = entry["Image Index"].str.strip()
    root = Path(images_dir) if images_dir is not None else csv.parent
    located = {}
    for rel in _walk_files(root, (".png",)):
        located.setdefault(rel.rsplit("/", 1)[-1], rel)
    rel = names.map(located)
    rel = rel.where(rel.notna(), names)
    pid = entry["Patient ID"].str.strip()
    pid = pid.where(~pid.str.fullmatch(r"\d+"), pid.str.zfill(8))
    follow = entry["Follow-up #"].str.strip() if "Follow-up #" in entry.columns else pd.Series("", index=entry.index)
    study = follow.where(~follow.str.fullmatch(r"\d+"), follow.str.zfill(3))
    df = pd.DataFrame({
        "image_id": _strip_suffix(names),
        "source_path": _join(root, rel),
        "patient_id": pid,
        "body_part": "CHEST",
        "study": study,
        "label": (findings != "No Finding").astype("int64"),
    })
    if train_val_list is not None or test_list is not None:
        df["official_split"] = _nih_official_split(names, train_val_list, test_list)
    df["finding_labels"] = findings
    extras = {"Follow-up #": "follow_up", "Patient Age": "patient_age", "Patient Gender": "patient_sex",
              "View Position": "view_position"}
    for col, new in extras.items():
        if col in entry.columns:
            df[new] = entry[col].str.strip()
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df, check_files=check_files, source=str(csv))


def _nih_official_split(names: pd.Series, train_val_list, test_list) -> pd.Series:
    tv = set(_read_list(train_val_list)) if train_val_list is not None else set()
    te = set(_read_list(test_list)) if test_list is not None else set()
    both = sorted(tv & te)
    if both:
        msg = f"{train_val_list} / {test_list}: " + format_listing(both, "images in both official lists")
        raise DataError(msg)
    out = pd.Series("", index=names.index, dtype=str)
    out[names.isin(tv)] = "train_val"
    out[names.isin(te)] = "test"
    return out


# --------------------------------------------------------------------------------------- folder
_PATH_ALIASES = ("path", "image", "file", "filename", "image_path", "source_path")
_PATIENT_ALIASES = ("patient_id", "patient_or_image_id", "patient", "patientid")
_BODY_ALIASES = ("body_part", "bodypart", "body_part_examined", "bodypartexamined")
_STUDY_ALIASES = ("study", "study_id", "follow_up")


def pick_column(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    for alias in aliases:
        if alias in lower:
            return lower[alias]
    return None


def read_user_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        msg = f"{path}: cannot read: {err}"
        raise DataError(msg) from None


def build_folder_manifest(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None, *,
                          body_part: str = "unknown", check_files: bool = True) -> pd.DataFrame:
    """Manifest of a folder of images: ``normal/`` + ``abnormal/`` sub-folders, or a labels CSV.

    Without ``labels_csv``: images (:data:`IMAGE_SUFFIXES`) anywhere under ``root/normal`` (label 0)
    and ``root/abnormal`` (label 1); if neither folder exists, ``root/labels.csv`` is used. With a
    CSV: columns ``path,label[,patient_id,body_part,study,image_id]`` (aliases: ``image``/``file``
    for path, ``patient_or_image_id`` for patient id); ``label`` is 0/1/-1 or normal/abnormal; paths
    are relative to ``root``. Other CSV columns are kept (renamed ``csv_<name>`` if they clash with a
    manifest column).

    ``image_id`` is the path relative to ``root`` without suffix (``images/00000001_000``); without a
    patient column, ``patient_id`` is the image id (each image its own group).

    Args:
        root: the folder (or the labels CSV itself, then its folder is the root).
        labels_csv: the labels CSV (relative names are looked up under ``root`` too).
        body_part: body part when the CSV has no such column.
        check_files: check that every CSV path exists.

    Raises:
        DataError: no images, no path/label column, bad labels, duplicates, missing files.
    """
    root = Path(root)
    if root.is_file() and labels_csv is None:
        root, labels_csv = root.parent, root
    if labels_csv is None:
        if not (root / "normal").is_dir() and not (root / "abnormal").is_dir():
            if (root / "labels.csv").is_file():
                labels_csv = root / "labels.csv"
            else:
                msg = f"{root}: expected normal/ and abnormal/ sub-folders or a labels.csv"
                raise DataError(msg)
    if labels_csv is not None:
        return _folder_from_csv(root, Path(labels_csv), body_part, check_files)
    rel, label = [], []
    for name, value in (("normal", 0), ("abnormal", 1)):
        if (root / name).is_dir():
            found = [f"{name}/{r}" for r in _walk_files(root / name, IMAGE_SUFFIXES)]
            rel += found
            label += [value] * len(found)
    if not rel:
        msg = f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) under normal/ or abnormal/"
        raise DataError(msg)
    rel_s = pd.Series(rel, dtype=str)
    ids = _strip_suffix(rel_s)
    df = pd.DataFrame({"image_id": ids, "source_path": _join(root, rel_s), "patient_id": ids,
                       "body_part": body_part, "study": "", "label": pd.Series(label, dtype="int64")})
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df, check_files=False, source=str(root))


def _folder_from_csv(root: Path, labels_csv: Path, body_part: str, check_files: bool) -> pd.DataFrame:
    if not labels_csv.is_file() and not labels_csv.is_absolute() and (root / labels_csv).is_file():
        labels_csv = root / labels_csv
    table = read_user_csv(labels_csv)
    where = str(labels_csv)
    path_col = pick_column(table.columns, _PATH_ALIASES)
    label_col = pick_column(table.columns, ("label",))
    if path_col is None or label_col is None:
        msg = (f"{where}: needs a path column ({'/'.join(_PATH_ALIASES)}) and a label column "
               f"(found: {', '.join(table.columns)})")
        raise DataError(msg)
    if table.empty:
        msg = f"{where}: no rows"
        raise DataError(msg)
    rel = table[path_col].str.strip()
    id_col = pick_column(table.columns, ("image_id",))
    ids = table[id_col].str.strip() if id_col else _strip_suffix(rel.str.replace(r"^\./", "", regex=True))
    patient_col = pick_column(table.columns, _PATIENT_ALIASES)
    body_col = pick_column(table.columns, _BODY_ALIASES)
    study_col = pick_column(table.columns, _STUDY_ALIASES)
    df = pd.DataFrame({
        "image_id": ids,
        "source_path": _join(root, rel),
        "patient_id": table[patient_col].str.strip() if patient_col else ids,
        "body_part": table[body_col].str.strip() if body_col else body_part,
        "study": table[study_col].str.strip() if study_col else "",
        "label": parse_labels(table[label_col], where),
    })
    used = {c for c in (path_col, label_col, id_col, patient_col, body_col, study_col) if c}
    for col in table.columns:
        if col not in used:
            name = f"csv_{col}" if col in df.columns or col in STRING_COLUMNS else col
            df[name] = _infer_numeric(table[col])
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df, check_files=check_files, source=where)


# ---------------------------------------------------------------------------------------- DICOM
# PatientName is deliberately absent: it is never read, so it can never be logged.
_DICOM_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "BodyPartExamined",
               "Modality"]


def _read_dicom_header(path: Path):
    """Header of ``path`` (only :data:`_DICOM_TAGS`, no pixels), or ``None`` when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except InvalidDicomError:
        if path.suffix.lower() not in ("", ".dcm", ".dicom"):
            return None
        try:  # raw data set without the 128-byte preamble
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS, force=True)
        except Exception:  # noqa: BLE001 - anything unparsable is "not DICOM" here
            return None
        return ds if "SOPInstanceUID" in ds else None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def build_dicom_manifest(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None, *,
                         check_files: bool = True) -> pd.DataFrame:
    """Manifest of a tree of DICOM files, from their headers only (``stop_before_pixels=True``).

    Reads PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, BodyPartExamined and
    Modality (DICOM PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.12.1); PatientName is never read. Files that
    are not DICOM (no parsable header or no SOPInstanceUID) are skipped with a warning naming them.

    Args:
        root: the tree.
        labels_csv: optional CSV ``sop_instance_uid,label`` or ``path,label`` (path relative to
            ``root`` or absolute); files it does not label get -1.
        check_files: kept for API symmetry (walked files exist by construction).

    Returns:
        Manifest sorted by ``image_id`` (the path relative to ``root`` without suffix):
        ``patient_id`` = PatientID (``unknown-<StudyInstanceUID>`` when empty), ``study`` =
        StudyInstanceUID, ``body_part`` = BodyPartExamined upper-cased (``UNKNOWN`` when absent),
        plus ``sop_instance_uid``, ``study_instance_uid``, ``series_instance_uid``, ``modality``.

    Raises:
        DataError: no DICOM file found, bad labels CSV.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"{root}: not a folder"
        raise DataError(msg)
    candidates = [r for r in _walk_files(root) if os.path.splitext(r)[1].lower() not in _NON_DICOM_SUFFIXES
                  and os.path.basename(r) != "DICOMDIR"]
    rows, skipped = [], []
    for rel in progress(candidates, "reading DICOM headers", total=len(candidates)):
        ds = _read_dicom_header(root / rel)
        if ds is None or not str(ds.get("SOPInstanceUID", "")).strip():
            skipped.append(rel)
            continue
        rows.append((rel, *(str(ds.get(tag, "") or "").strip() for tag in _DICOM_TAGS)))
    if skipped:
        log.warning("%s: skipped %s", root, format_listing(skipped, "files that are not DICOM images"))
    if not rows:
        msg = f"{root}: no DICOM files found"
        raise DataError(msg)
    t = pd.DataFrame(rows, columns=["rel", *_DICOM_TAGS]).astype(str)
    ids = _strip_suffix(t["rel"])
    study_or_id = t["StudyInstanceUID"].where(t["StudyInstanceUID"] != "", ids)
    no_pid = t["PatientID"] == ""
    if no_pid.any():
        log.warning("%d DICOM files have no PatientID; their patient is 'unknown-<StudyInstanceUID>'",
                    int(no_pid.sum()))
    body = t["BodyPartExamined"].str.upper()
    df = pd.DataFrame({
        "image_id": ids,
        "source_path": _join(root, t["rel"]),
        "patient_id": t["PatientID"].where(~no_pid, "unknown-" + study_or_id),
        "body_part": body.where(body != "", "UNKNOWN"),
        "study": t["StudyInstanceUID"],
        "label": -1,
        "sop_instance_uid": t["SOPInstanceUID"],
        "study_instance_uid": t["StudyInstanceUID"],
        "series_instance_uid": t["SeriesInstanceUID"],
        "modality": t["Modality"],
    })
    dup = df["sop_instance_uid"][df["sop_instance_uid"].duplicated(keep=False)]
    if len(dup):
        log.warning("%s: %s", root, format_listing(sorted(set(dup)), "SOP Instance UIDs stored in several files"))
    if labels_csv is not None:
        df["label"] = _dicom_labels(df, root, Path(labels_csv))
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df, check_files=False, source=str(root))


def _dicom_labels(df: pd.DataFrame, root: Path, labels_csv: Path) -> pd.Series:
    table = read_user_csv(labels_csv)
    where = str(labels_csv)
    label_col = pick_column(table.columns, ("label",))
    uid_col = pick_column(table.columns, ("sop_instance_uid", "sopinstanceuid", "sop_uid"))
    path_col = pick_column(table.columns, _PATH_ALIASES)
    if label_col is None or (uid_col is None and path_col is None):
        msg = f"{where}: needs a label column and a sop_instance_uid or path column (found: {', '.join(table.columns)})"
        raise DataError(msg)
    labels = parse_labels(table[label_col], where)
    if uid_col is not None:
        keys, targets = table[uid_col].str.strip(), df["sop_instance_uid"]
    else:
        keys = _join(root, table[path_col].str.strip()).map(os.path.normpath)
        targets = df["source_path"].map(os.path.normpath)
    if keys.duplicated().any():
        msg = f"{where}: " + format_listing(sorted(set(keys[keys.duplicated()])), "keys listed twice")
        raise DataError(msg)
    mapping = pd.Series(labels.to_numpy(), index=keys.to_numpy())
    out = targets.map(mapping)
    unused = int((~keys.isin(set(targets))).sum())
    if unused:
        log.warning("%s: %d labelled entries match no DICOM file under %s", where, unused, root)
    return out.fillna(-1).astype("int64")


def build_manifest(dataset: str, source: str | os.PathLike, *, labels: str | os.PathLike | None = None,
                   images_dir: str | os.PathLike | None = None, train_val_list: str | os.PathLike | None = None,
                   test_list: str | os.PathLike | None = None, body_part: str = "unknown",
                   check_files: bool = True) -> pd.DataFrame:
    """Dispatch to the builder of ``dataset`` (``mura``, ``nih``, ``folder``, ``dicom``).

    ``source`` is the MURA root, ``Data_Entry_2017.csv`` (NIH; ``images_dir`` = images folder), the
    folder (``labels`` = labels CSV) or the DICOM tree (``labels`` = labels CSV).

    Raises:
        ConfigError: unknown dataset or an option the dataset does not take.
    """
    if dataset == "mura":
        return build_mura_manifest(source, check_files=check_files)
    if dataset == "nih":
        return build_nih_manifest(labels or source, images_dir, train_val_list, test_list, check_files=check_files)
    if dataset == "folder":
        return build_folder_manifest(source, labels, body_part=body_part, check_files=check_files)
    if dataset == "dicom":
        return build_dicom_manifest(source, labels, check_files=check_files)
    msg = f"unknown dataset {dataset!r} (expected mura, nih, folder or dicom)"
    raise ConfigError(msg)


# --------------------------------------------------------------------------------------- shards
_SHARD_RE = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.csv$")


def shard_file_name(i: int, n: int, stem: str = "manifest") -> str:
    """``manifest.shard-i-of-n.csv`` (``stem="failures"`` for the failure log of shard ``i``)."""
    return f"{stem}.shard-{i}-of-{n}.csv"


def find_shards(paths: Iterable[str | os.PathLike]) -> list[tuple[int, int, Path]]:
    """Shard manifests ``manifest.shard-i-of-n.csv`` among ``paths`` (files, or folders searched).

    Returns:
        ``(i, n, path)`` sorted by ``i``.

    Raises:
        DataError: no shard found, a file not named like a shard, shards of different ``n``,
            the same shard twice, or gaps (indices must be exactly ``1..n`` or ``0..n-1``).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if _SHARD_RE.match(f.name) and f.name.startswith("manifest."))
        elif p.is_file():
            files.append(p)
        else:
            msg = f"{p}: no such shard manifest or folder"
            raise DataError(msg)
    if not files:
        msg = "no shard manifests (manifest.shard-i-of-n.csv) found in " + ", ".join(map(str, paths))
        raise DataError(msg)
    shards = []
    for f in files:
        m = _SHARD_RE.match(f.name)
        if m is None:
            msg = f"{f}: not a shard manifest name (expected {shard_file_name('i', 'n')})"
            raise DataError(msg)
        shards.append((int(m["i"]), int(m["n"]), f))
    ns = sorted({n for _, n, _ in shards})
    if len(ns) != 1:
        msg = f"shard manifests of different shard counts n={ns}: " + ", ".join(str(f) for *_, f in shards)
        raise DataError(msg)
    n = ns[0]
    index = [i for i, _, _ in shards]
    twice = sorted({i for i in index if index.count(i) > 1})
    if twice:
        msg = "the same shard given twice: " + ", ".join(str(f) for i, _, f in shards if i in twice)
        raise DataError(msg)
    have = set(index)
    base = 0 if 0 in have else 1
    expected = set(range(base, base + n))
    if have != expected:
        gaps = sorted(expected - have)
        extra = sorted(have - expected)
        msg = (f"shards are incomplete for n={n}: missing "
               + ", ".join(shard_file_name(i, n) for i in gaps)
               + (f"; out of range: {', '.join(shard_file_name(i, n) for i in extra)}" if extra else ""))
        raise DataError(msg)
    return sorted(shards)


def merge_shards(paths: Iterable[str | os.PathLike], *, check_files: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join the shard manifests of ``salad-med preprocess --shard i/n`` and their failure logs.

    Each ``manifest.shard-i-of-n.csv`` may have a ``failures.shard-i-of-n.csv`` beside it
    (``source_path, reason``; absent = no failures). Every shard must be present (no gaps) and no
    image may be in two shards (same ``image_id`` or ``source_path``, in a manifest or failure log).

    Returns:
        ``(manifest, failures)``: the merged manifest sorted by ``image_id`` and the merged failures
        sorted by ``source_path`` (with a ``shard`` column ``i/n``).

    Raises:
        DataError: gaps, overlaps, or an invalid shard manifest.
    """
    shards = find_shards(paths)
    frames, fails = [], []
    for i, n, path in shards:
        df = load_manifest(path, check_files=check_files)
        df["_shard"] = f"{i}/{n}"
        frames.append(df)
        fpath = path.with_name(shard_file_name(i, n, "failures"))
        if fpath.is_file():
            fdf = pd.read_csv(fpath, dtype=str, keep_default_na=False)
            if "source_path" not in fdf.columns:
                msg = f"{fpath}: failure log without a source_path column"
                raise DataError(msg)
            fdf["shard"] = f"{i}/{n}"
            fails.append(fdf)
    merged = pd.concat(frames, ignore_index=True)
    failures = (pd.concat(fails, ignore_index=True) if fails
                else pd.DataFrame({"source_path": pd.Series(dtype=str), "reason": pd.Series(dtype=str),
                                   "shard": pd.Series(dtype=str)}))
    problems = []
    for col in ("image_id", "source_path"):
        owners = merged.groupby(col)["_shard"].nunique()
        overlap = owners.index[owners > 1]
        if len(overlap):
            problems.append(format_listing(sorted(overlap), f"{col} in several shards"))
    if len(failures):
        where_ok = merged.drop_duplicates("source_path").set_index("source_path")["_shard"]
        f_owner = failures["source_path"].map(where_ok)
        clash = f_owner.notna() & (f_owner != failures["shard"])
        fdup = failures.groupby("source_path")["shard"].nunique()
        bad = sorted(set(failures["source_path"][clash]) | set(fdup.index[fdup > 1]))
        if bad:
            problems.append(format_listing(bad, "failed inputs also recorded by another shard"))
    if problems:
        msg = "cannot merge shards: " + "; ".join(problems)
        raise DataError(msg)
    merged = merged.drop(columns="_shard").sort_values("image_id", kind="stable").reset_index(drop=True)
    failures = failures.sort_values(["source_path", "shard"], kind="stable").reset_index(drop=True)
    return validate_manifest(merged, check_files=False, source="merged shards"), failures


def merge_manifests(paths: Iterable[str | os.PathLike], *, check_files: bool = False) -> pd.DataFrame:
    """The merged manifest of :func:`merge_shards` (failure logs are checked for overlaps too)."""
    return merge_shards(paths, check_files=check_files)[0]
