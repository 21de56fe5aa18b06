"""Study-level triage: group image scores by study, rank the studies, write one study SR per study.

A radiologist's worklist holds studies, not images. Images are grouped by study (DICOM: the
StudyInstanceUID; image files: their folder, which is the study folder of a MURA tree
``XR_<PART>/patient<ID>/study<N>_<outcome>/image<K>.png``; manifests: the ``patient_id``, ``body_part``
and ``study`` columns) and each study gets one score:

* ``max`` (default): the score of its most abnormal image. One abnormal view makes an abnormal study,
  which is how MURA labels are defined (a study is abnormal when the radiologist saw an abnormality on
  any of its views); a study of many views is ranked by its worst one.
* ``mean``: the mean of its image scores. Smoother (one noisy view moves it less) but a single abnormal
  view among normal ones is diluted: use it when views of the same study are redundant.

``score`` is the aggregate of the calibrated image scores (for ``max``: the fraction of validation
normal images scoring below the study's most abnormal image; for ``mean``: the mean of those fractions);
``raw_score`` the aggregate of the raw scores. Studies are ranked on ``raw_score``, as images are.

The study SR (:func:`build_study_sr`) is a TID 1500 Measurement Report like the per-image SR of
:mod:`salad_med.dicom.sr`, with one more measurement group first:

* ``(1005, 99SALAD, "SALAD study anomaly score")`` with Derivation ``(56851009, SCT, "Maximum")`` or
  ``(373098007, SCT, "Mean")``, referencing every image of the study;
* ``(1006, 99SALAD, "SALAD study raw anomaly score")``, same derivation;
* then one group per image exactly as in the per-image SR (score, raw score, out-of-distribution
  finding, the image as source).

Example:
    >>> df["study"] = study_keys(df["source_path"])          # StudyInstanceUID or the study folder
    >>> studies = aggregate_studies(df, how="max")            # ranked, most abnormal first
    >>> write_study_sr(["a.dcm", "b.dcm"], [0.4, 0.97], "study_sr.dcm", raw_scores=[0.1, 0.3])
    >>> read_study_sr("study_sr.dcm").score
    0.97

See Also:
    highdicom ``sr/templates.py`` (MeasurementReport, Measurement ``derivation``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from preprocessing.atomic import atomic_path
from salad_med import __version__
from salad_med.dicom.sr import (
    ANOMALY_SCORE,
    INPUT_DISTRIBUTION,
    NO_UNITS,
    OUT_OF_DISTRIBUTION,
    PROCEDURE_REPORTED,
    RAW_ANOMALY_SCORE,
    SALAD_SCHEME,
    algorithm_identification,
    load_header,
    quiet_phi_warnings,
)
from salad_med.errors import ConfigError, DataError

__all__ = [
    "AGGREGATIONS",
    "STUDY_ANOMALY_SCORE",
    "STUDY_RAW_ANOMALY_SCORE",
    "STUDY_SERIES_DESCRIPTION",
    "STUDY_COLUMNS",
    "ImageScore",
    "StudyReport",
    "aggregate",
    "study_keys",
    "manifest_study_keys",
    "aggregate_studies",
    "write_studies_csv",
    "triage_studies",
    "build_study_sr",
    "write_study_sr",
    "write_study_srs",
    "read_study_sr",
    "is_study_sr",
]

#: Study score aggregations (see the module docstring).
AGGREGATIONS = ("max", "mean")
#: Concept name of the study anomaly score (aggregate of the calibrated image scores).
STUDY_ANOMALY_SCORE = Code("1005", SALAD_SCHEME, "SALAD study anomaly score")
#: Concept name of the study raw anomaly score (aggregate of the raw image scores).
STUDY_RAW_ANOMALY_SCORE = Code("1006", SALAD_SCHEME, "SALAD study raw anomaly score")
STUDY_SERIES_DESCRIPTION = "SALAD study anomaly score - not for clinical use"
_DERIVATION = {"max": codes.SCT.Maximum, "mean": codes.SCT.Mean}
_STUDY_TRACKING_ID = "SALAD study anomaly score"
_IMAGE_TRACKING_ID = "SALAD anomaly score"
#: Columns of :func:`aggregate_studies` (``label`` is added when the images carry labels).
STUDY_COLUMNS = ["rank", "study", "study_instance_uid", "n_images", "n_scored", "n_failed", "n_ood", "score",
                 "raw_score", "aggregate", "top_image_id"]


def _check_how(how: str) -> str:
    if how not in AGGREGATIONS:
        msg = f"study score aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}"
        raise ConfigError(msg)
    return how


def aggregate(values: Sequence[float] | np.ndarray, how: str = "max") -> float:
    """``max`` or ``mean`` of finite ``values`` (NaN when there is none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan")
    return float(arr.max() if _check_how(how) == "max" else arr.mean())


# --------------------------------------------------------------------------- grouping
def _dicom_study_uid(path: str | os.PathLike) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - not DICOM (or unreadable): grouped by folder
        return ""
    return str(ds.get("StudyInstanceUID", "") or "")


def study_keys(paths: Sequence[str | os.PathLike] | pd.Series) -> pd.DataFrame:
    """The study of each file: DICOM StudyInstanceUID, else the file's folder (a MURA study folder).

    Returns:
        DataFrame(``study``, ``study_instance_uid``) in input order; ``study_instance_uid`` is empty for
        files that are not DICOM (their ``study`` is the folder path).
    """
    rows = []
    for p in list(paths):
        uid = _dicom_study_uid(p) if Path(p).is_file() else ""
        rows.append({"study": uid or str(Path(p).parent), "study_instance_uid": uid})
    return pd.DataFrame(rows, columns=["study", "study_instance_uid"])


def manifest_study_keys(rows: pd.DataFrame) -> pd.Series | None:
    """The study key of each manifest row, or ``None`` when the manifest has no ``study`` values.

    MURA numbers studies per patient and body part (``study1`` of ``patient00001`` in ``XR_WRIST``), so
    the key joins ``patient_id``, ``body_part`` and ``study`` (those present); a StudyInstanceUID is
    unique on its own and joined the same way.
    """
    if "study" not in rows.columns:
        return None
    study = rows["study"].fillna("").astype(str).str.strip()
    if not (study != "").any():
        return None
    parts = [rows[c].fillna("").astype(str) for c in ("patient_id", "body_part") if c in rows.columns]
    key = study
    for part in reversed(parts):
        key = part + "/" + key
    return key


def aggregate_studies(df: pd.DataFrame, how: str = "max", key: str = "study") -> pd.DataFrame:
    """One row per study, ranked from most to least abnormal.

    Args:
        df: image table with ``key``, ``image_id``, ``score``, ``raw_score``, ``status`` (rows whose status
            is not ``ok`` count as failed), optionally ``ood``, ``study_instance_uid`` and ``label``.
        how: ``max`` or ``mean`` (see the module docstring).
        key: the study column.

    Returns:
        DataFrame with :data:`STUDY_COLUMNS` (plus ``label`` = the most abnormal image label when ``df``
        has labels): ``rank`` 1 = most abnormal study raw score (ties share the lower rank; studies with
        no scored image have no rank and come last).

    Raises:
        ConfigError: ``how`` is not an aggregation.
    """
    _check_how(how)
    if key not in df.columns:
        msg = f"no {key!r} column to group images by study"
        raise DataError(msg)
    status = df["status"] if "status" in df.columns else pd.Series("ok", index=df.index)
    ood = df["ood"].fillna(False).astype(bool) if "ood" in df.columns else pd.Series(False, index=df.index)
    rows = []
    for study, g in df.groupby(key, sort=False):
        ok = (status.loc[g.index] == "ok") & np.isfinite(g["raw_score"].astype(float))
        scored = g[ok]
        row = {"study": study,
               "study_instance_uid": str(g["study_instance_uid"].iloc[0]) if "study_instance_uid" in g else "",
               "n_images": len(g), "n_scored": int(ok.sum()), "n_failed": int((~ok).sum()),
               "n_ood": int(ood.loc[scored.index].sum()),
               "score": aggregate(scored["score"], how), "raw_score": aggregate(scored["raw_score"], how),
               "aggregate": how,
               "top_image_id": str(scored.loc[scored["raw_score"].astype(float).idxmax(), "image_id"])
               if len(scored) else ""}
        if "label" in g.columns:
            labels = pd.to_numeric(g["label"], errors="coerce")
            row["label"] = labels.max() if labels.notna().any() else np.nan
        rows.append(row)
    columns = STUDY_COLUMNS[1:] + (["label"] if "label" in df.columns else [])
    out = pd.DataFrame(rows, columns=columns)
    out.insert(0, "rank", out["raw_score"].rank(ascending=False, method="min").astype("Int64"))
    return out.sort_values(["rank", "study"], na_position="last", kind="stable").reset_index(drop=True)


def write_studies_csv(studies: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a study table (:func:`aggregate_studies`) atomically, most abnormal study first."""
    with atomic_path(path) as tmp:
        studies.to_csv(tmp, index=False, float_format="%.10g")
    return Path(path)


def triage_studies(df: pd.DataFrame, output: str | os.PathLike, how: str = "max", **kwargs) -> pd.DataFrame:
    """Study triage of a ``salad-med score`` table: group, write the study SRs and ``studies.csv``.

    Adds ``study`` and ``study_instance_uid`` columns to ``df`` (in place) when it has none
    (:func:`study_keys`), writes one study SR per DICOM study under ``output/study_sr`` and the ranked
    table to ``output/studies.csv``.

    Args:
        df: ``score_paths`` table with ``sr_path`` (per-image SRs).
        output: the output folder.
        how: ``max`` or ``mean``.
        **kwargs: forwarded to :func:`build_study_sr`.

    Returns:
        The ranked study table (:data:`STUDY_COLUMNS` + ``sr_path``).
    """
    _check_how(how)
    output = Path(output)
    if "study" not in df.columns:
        keys = study_keys(df["source_path"])
        df["study"] = keys["study"].to_numpy()
        df["study_instance_uid"] = keys["study_instance_uid"].to_numpy()
    srs = write_study_srs(df, output / "study_sr", how, **kwargs) if len(df) else {}
    table = aggregate_studies(df, how=how)
    table["sr_path"] = [srs.get(str(u), "") for u in table["study_instance_uid"]]
    output.mkdir(parents=True, exist_ok=True)
    write_studies_csv(table, output / "studies.csv")
    return table


# --------------------------------------------------------------------------- the study SR
@dataclass(frozen=True)
class ImageScore:
    """One image's entry in a study SR."""

    score: float
    raw_score: float | None
    out_of_distribution: bool
    sop_class_uid: str


@dataclass(frozen=True)
class StudyReport:
    """What :func:`read_study_sr` finds in a salad-med study SR.

    Attributes:
        score: the study anomaly score; ``raw_score``: the study raw score (or ``None``).
        aggregate: ``max`` or ``mean`` (from the Derivation of the study score).
        study_instance_uid: the study reported on.
        images: per referenced image SOP Instance UID, its :class:`ImageScore`.
        study_referenced_uids: the images the study score itself references (all of them).
        sop_instance_uid, series_instance_uid: the SR's own UIDs.
        algorithm_name, algorithm_version: TID 4019.
    """

    score: float
    raw_score: float | None
    aggregate: str
    study_instance_uid: str
    images: dict[str, ImageScore] = field(default_factory=dict)
    study_referenced_uids: tuple[str, ...] = ()
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    algorithm_name: str = ""
    algorithm_version: str = ""


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def build_study_sr(
    sources: Sequence[Dataset | str | os.PathLike],
    scores: Sequence[float],
    *,
    raw_scores: Sequence[float | None] | None = None,
    out_of_distribution: Sequence[bool] | None = None,
    how: str = "max",
    algorithm_name: str = "salad-med",
    algorithm_version: str = __version__,
    algorithm_parameters: list[str] | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 991,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_description: str = STUDY_SERIES_DESCRIPTION,
    manufacturer: str = "salad-med",
    previous_versions: Sequence[Dataset] | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build (not write) the Comprehensive SR of one study: the study score and every image's scores.

    Args:
        sources: the scored images of one study (pydicom Datasets or paths; headers only are used).
        scores: calibrated image scores, one per source (higher = more abnormal).
        raw_scores: raw image scores (``None`` entries allowed).
        out_of_distribution: the OOD guard's flag per image.
        how: ``max`` or ``mean``: how the study score aggregates the image scores.
        algorithm_name, algorithm_version, algorithm_parameters: TID 4019.
        series_instance_uid, series_number, sop_instance_uid, instance_number: the SR's identity
            (new UIDs by default).
        series_description: SR Series Description.
        manufacturer: Manufacturer of the "device" writing the SR.
        previous_versions: earlier study SRs this one replaces (Predecessor Documents Sequence), e.g.
            when an image arrived after the first study SR.

    Returns:
        The SR dataset, Patient/Study modules inherited from the sources.

    Raises:
        DataError: no source, sources of different studies, a source that cannot be referenced, or the
            same image twice.
        ValueError: a score is not finite, or the lengths differ.
    """
    _check_how(how)
    n = len(sources)
    raw_scores = list(raw_scores) if raw_scores is not None else [None] * n
    out_of_distribution = list(out_of_distribution) if out_of_distribution is not None else [False] * n
    if not n:
        msg = "a study SR needs at least one scored image"
        raise DataError(msg)
    if not len(scores) == len(raw_scores) == len(out_of_distribution) == n:
        msg = f"{n} sources but {len(scores)} scores, {len(raw_scores)} raw scores, {len(out_of_distribution)} flags"
        raise ValueError(msg)
    for value in [*scores, *(r for r in raw_scores if r is not None)]:
        if not math.isfinite(float(value)):
            msg = f"scores must be finite numbers, got {value!r}"
            raise ValueError(msg)
    with quiet_phi_warnings():
        headers = [load_header(s) for s in sources]
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) != 1:
        msg = f"a study SR covers one study; the images belong to {len(studies)} studies"
        raise DataError(msg)
    uids = [str(h.SOPInstanceUID) for h in headers]
    if len(set(uids)) != n:
        msg = "the same image (SOP Instance UID) is given twice"
        raise DataError(msg)
    algorithm = algorithm_identification(algorithm_name, algorithm_version, algorithm_parameters)
    raws = [r for r in raw_scores if r is not None]
    refs_all = [hd.sr.SourceImageForMeasurement.from_source_image(h) for h in headers]
    study_measurements = [hd.sr.Measurement(name=STUDY_ANOMALY_SCORE, value=aggregate(scores, how), unit=NO_UNITS,
                                            derivation=_DERIVATION[how], algorithm_id=algorithm,
                                            referenced_images=refs_all)]
    if len(raws) == n:
        study_measurements.append(hd.sr.Measurement(
            name=STUDY_RAW_ANOMALY_SCORE, value=aggregate(raws, how), unit=NO_UNITS, derivation=_DERIVATION[how],
            algorithm_id=algorithm, referenced_images=refs_all))
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_STUDY_TRACKING_ID),
        algorithm_id=algorithm, measurements=study_measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(INPUT_DISTRIBUTION, OUT_OF_DISTRIBUTION)]
        if any(out_of_distribution) else None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers])]
    for header, score, raw, ood in zip(headers, scores, raw_scores, out_of_distribution, strict=True):
        ref = [hd.sr.SourceImageForMeasurement.from_source_image(header)]
        measurements = [hd.sr.Measurement(name=ANOMALY_SCORE, value=float(score), unit=NO_UNITS,
                                          algorithm_id=algorithm, referenced_images=ref)]
        if raw is not None:
            measurements.append(hd.sr.Measurement(name=RAW_ANOMALY_SCORE, value=float(raw), unit=NO_UNITS,
                                                  algorithm_id=algorithm, referenced_images=ref))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_IMAGE_TRACKING_ID),
            algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(INPUT_DISTRIBUTION, OUT_OF_DISTRIBUTION)]
            if ood else None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[algorithm_name, algorithm_version]), name=algorithm_name,
            manufacturer_name=manufacturer, model_name=algorithm_version))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=PROCEDURE_REPORTED, imaging_measurements=groups)
    with quiet_phi_warnings():  # every image is evidence; Patient/Study modules come from them
        sr = hd.sr.ComprehensiveSR(evidence=headers, content=report[0], is_complete=True, is_final=False,
                                   is_verified=False, series_instance_uid=series_instance_uid or generate_uid(),
                                   series_number=series_number, sop_instance_uid=sop_instance_uid or generate_uid(),
                                   instance_number=instance_number, manufacturer=manufacturer,
                                   previous_versions=list(previous_versions) if previous_versions else None)
    sr.SeriesDescription = series_description
    return sr


def write_study_sr(sources, scores, output_path: str | os.PathLike, **kwargs) -> Path:
    """Write the study SR atomically (temp file + rename); see :func:`build_study_sr`. Returns the path."""
    sr = build_study_sr(sources, scores, **kwargs)
    with atomic_path(output_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return Path(output_path)


def write_study_srs(df: pd.DataFrame, output_dir: str | os.PathLike, how: str = "max", **kwargs) -> dict[str, str]:
    """One study SR per DICOM study of a ``score_paths`` table that has a ``study_instance_uid`` column.

    Only images scored ``ok`` that have a per-image SR (``sr_path``) are included; a study SR that cannot
    be written is logged (UIDs only) and skipped.

    Args:
        df: image table with ``study_instance_uid``, ``source_path``, ``score``, ``raw_score``, ``ood``,
            ``status`` and ``sr_path``.
        output_dir: folder of ``<StudyInstanceUID>.dcm``.
        how: ``max`` or ``mean``.
        **kwargs: forwarded to :func:`build_study_sr` (``algorithm_parameters``...).

    Returns:
        ``{StudyInstanceUID: SR path}`` of the studies written.
    """
    from salad_med.log import get_logger

    _check_how(how)
    ok = df[(df["status"] == "ok") & (df["study_instance_uid"].fillna("") != "")]
    if "sr_path" in ok.columns:
        ok = ok[ok["sr_path"].fillna("") != ""]
    out = {}
    for study, g in ok.groupby("study_instance_uid", sort=False):
        raw = [float(r) if math.isfinite(float(r)) else None for r in g["raw_score"]]
        try:
            out[str(study)] = str(write_study_sr(
                g["source_path"].tolist(), g["score"].astype(float).tolist(), Path(output_dir) / f"{study}.dcm",
                raw_scores=raw, out_of_distribution=g["ood"].fillna(False).astype(bool).tolist(), how=how, **kwargs))
        except (DataError, ValueError) as err:
            get_logger("dicom_sr").warning("no study SR for %s: %s", study, err)
    return out


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else None


def _key(code: Code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def _items(items):
    for item in items or []:
        yield item
        yield from _items(item.get("ContentSequence"))


def _group_summary(group: Dataset) -> tuple[dict, list[Dataset], dict]:
    """(NUM values by concept, IMAGE references, derivations by concept) within one measurement group."""
    values, refs, derivations, ood = {}, [], {}, False
    for item in _items(group.get("ContentSequence")):
        concept = _concept(item)
        kind = item.get("ValueType")
        if kind == "NUM" and concept is not None:
            values[concept] = float(item.MeasuredValueSequence[0].NumericValue)
            for sub in item.get("ContentSequence") or []:
                if _concept(sub) == _key(codes.DCM.Derivation) and sub.get("ConceptCodeSequence"):
                    derivations[concept] = str(sub.ConceptCodeSequence[0].CodeValue)
        elif kind == "IMAGE":
            refs.append(item.ReferencedSOPSequence[0])
        elif kind == "CODE" and concept == _key(INPUT_DISTRIBUTION) and item.get("ConceptCodeSequence"):
            ood = ood or str(item.ConceptCodeSequence[0].CodeValue) == OUT_OF_DISTRIBUTION.value
    return values, refs, {"derivations": derivations, "ood": ood}


def _measurement_groups(ds: Dataset) -> list[Dataset]:
    return [item for item in _items(ds.get("ContentSequence"))
            if item.get("ValueType") == "CONTAINER" and _concept(item) == _key(codes.DCM.MeasurementGroup)]


def is_study_sr(ds: Dataset) -> bool:
    """True when ``ds`` holds a "SALAD study anomaly score" measurement."""
    return any(item.get("ValueType") == "NUM" and _concept(item) == _key(STUDY_ANOMALY_SCORE)
               for item in _items(ds.get("ContentSequence")))


def read_study_sr(path_or_dataset: Dataset | str | os.PathLike) -> StudyReport:
    """Read the study score, its aggregation and every image's scores back from a salad-med study SR.

    Raises:
        DataError: the file is not a salad-med study SR.
    """
    ds = path_or_dataset if isinstance(path_or_dataset, Dataset) else pydicom.dcmread(path_or_dataset)
    name = getattr(ds, "filename", None) or "<dataset>"
    study = None
    images: dict[str, ImageScore] = {}
    for group in _measurement_groups(ds):
        values, refs, extra = _group_summary(group)
        if _key(STUDY_ANOMALY_SCORE) in values:
            derivation = extra["derivations"].get(_key(STUDY_ANOMALY_SCORE))
            how = next((k for k, c in _DERIVATION.items() if c.value == derivation), "")
            uids = tuple(dict.fromkeys(str(r.ReferencedSOPInstanceUID) for r in refs))
            study = (values[_key(STUDY_ANOMALY_SCORE)], values.get(_key(STUDY_RAW_ANOMALY_SCORE)), how, uids)
        elif _key(ANOMALY_SCORE) in values and refs:
            ref = refs[0]
            images[str(ref.ReferencedSOPInstanceUID)] = ImageScore(
                score=values[_key(ANOMALY_SCORE)], raw_score=values.get(_key(RAW_ANOMALY_SCORE)),
                out_of_distribution=bool(extra["ood"]), sop_class_uid=str(ref.ReferencedSOPClassUID))
    if study is None:
        msg = f"{name}: not a salad-med study SR (no {STUDY_ANOMALY_SCORE.meaning!r} measurement)"
        raise DataError(msg)
    texts = {}
    for item in _items(ds.get("ContentSequence")):
        concept = _concept(item)
        if item.get("ValueType") == "TEXT" and concept is not None and concept[1] == "DCM":
            texts.setdefault(concept[0], str(item.TextValue))
    return StudyReport(score=study[0], raw_score=_finite_or_none(study[1]), aggregate=study[2],
                       study_instance_uid=str(ds.StudyInstanceUID), images=images, study_referenced_uids=study[3],
                       sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                       algorithm_name=texts.get("111001", ""), algorithm_version=texts.get("111003", ""))
