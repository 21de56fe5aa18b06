"""DICOM Structured Report output of SALAD anomaly scores.

One Comprehensive SR per scored image, following :dcm:`TID 1500 <part16/chapter_A.html#sect_TID_1500>`
(Measurement Report) with one :dcm:`TID 1501 <part16/chapter_A.html#sect_TID_1501>` measurement group:

* ``(1001, 99SALAD, "SALAD anomaly score")``: the calibrated score in [0, 1] (the fraction of the
  validation normal images that score lower; higher = more abnormal), unit ``(1, UCUM, "no units")``;
* ``(1002, 99SALAD, "SALAD raw anomaly score")``: the method's raw score, when given;
* ``(1003, 99SALAD, "Input distribution") = (1004, 99SALAD, "Out of distribution")``: a qualitative
  evaluation added when the out-of-distribution guard flagged the image (body part not seen in
  training, or an embedding farther from the training images than any validation normal): the score
  of such an image should not be trusted;
* algorithm name and version (:dcm:`TID 4019 <part16/sect_TID_4019.html>`) on the group and on each
  measurement; the device observer is the algorithm;
* the source image as evidence (Current Requested Procedure Evidence) and as "source of measurement",
  so the Patient and Study modules are inherited from it by highdicom, not hand-copied;
* optionally (``salad-med score --maps``) the image's anomaly map (:mod:`salad_med.dicom.maps`, a
  fractional Segmentation) as an IMAGE item ``(1005, 99SALAD, "Anomaly map")`` of the measurement group,
  listed in the evidence too;
* new Series and SOP Instance UIDs, Modality ``SR``, and the series description
  ``"SALAD anomaly score - not for clinical use"`` by default.

``99SALAD`` is a private coding scheme (PS3.16 8.2: designators starting with ``99`` are local).

Example:
    >>> write_score_sr("image.dcm", score=0.83, output_path="out/image_sr.dcm", raw_score=0.41)
    >>> read_score_sr("out/image_sr.dcm").score
    0.83

See Also:
    highdicom ``sr/sop.py`` (ComprehensiveSR) and ``sr/templates.py`` (MeasurementReport).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from preprocessing.atomic import atomic_path
from salad_med import __version__
from salad_med.errors import DataError

__all__ = [
    "SALAD_SCHEME",
    "ANOMALY_SCORE",
    "RAW_ANOMALY_SCORE",
    "INPUT_DISTRIBUTION",
    "OUT_OF_DISTRIBUTION",
    "ANOMALY_MAP",
    "NO_UNITS",
    "DEFAULT_SERIES_DESCRIPTION",
    "ScoreReport",
    "build_score_sr",
    "write_score_sr",
    "read_score_sr",
    "write_score_srs",
    "quiet_phi_warnings",
]

#: Private (local) coding scheme designator of salad-med concepts.
SALAD_SCHEME = "99SALAD"
#: Concept name of the normalised anomaly score in [0, 1] (higher = more abnormal).
ANOMALY_SCORE = Code("1001", SALAD_SCHEME, "SALAD anomaly score")
#: Concept name of the raw (un-normalised) Eq. 4 anomaly score.
RAW_ANOMALY_SCORE = Code("1002", SALAD_SCHEME, "SALAD raw anomaly score")
#: Concept name of the qualitative evaluation "is this input like the training images?".
INPUT_DISTRIBUTION = Code("1003", SALAD_SCHEME, "Input distribution")
#: Its value when the out-of-distribution guard flagged the image.
OUT_OF_DISTRIBUTION = Code("1004", SALAD_SCHEME, "Out of distribution")
#: Concept of an image's anomaly map (:mod:`salad_med.dicom.maps`), referenced by the measurement group.
ANOMALY_MAP = Code("1005", SALAD_SCHEME, "Anomaly map")
#: UCUM dimensionless unit.
NO_UNITS = codes.UCUM.NoUnits
DEFAULT_SERIES_DESCRIPTION = "SALAD anomaly score - not for clinical use"
# code value of the study score (salad_med.dicom.study): an SR holding it is not a per-image SR
_STUDY_SCORE_CODE = "1005"
_TRACKING_ID = "SALAD anomaly score"
# highdicom quotes the patient name in this warning, pydicom's value checks may quote values: never let
# PHI reach a log
_PHI_WARNING = r".*unlikely to represent the intended person name.*"


@contextlib.contextmanager
def quiet_phi_warnings() -> Iterator[None]:
    """Silence warnings that may quote header values (names, dates): highdicom's name check, pydicom's VR checks.

    ``warnings.catch_warnings`` is process-global; concurrent use from threads may at worst leave these
    filters installed, which only hides more of the same warnings.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PHI_WARNING)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?")
        yield
_PROCEDURE = codes.cid100.XRUnspecifiedBodyRegion
# Type 2 Patient / Study attributes highdicom reads from the evidence; absent ones become empty.
_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_DATE_TIME_KEYWORDS = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}
_REQUIRED_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class ScoreReport:
    """What :func:`read_score_sr` finds in a salad-med SR.

    Attributes:
        score: normalised anomaly score (higher = more abnormal).
        raw_score: raw Eq. 4 score, or ``None`` when the SR has none.
        referenced_sop_instance_uid: SOP Instance UID of the scored image.
        referenced_sop_class_uid: SOP Class UID of the scored image.
        algorithm_name: TID 4019 Algorithm Name.
        algorithm_version: TID 4019 Algorithm Version.
        sop_instance_uid: SOP Instance UID of the SR itself.
        series_instance_uid: Series Instance UID of the SR itself.
        out_of_distribution: the SR carries the "Out of distribution" finding.
        anomaly_map_sop_instance_uid: SOP Instance UID of the referenced anomaly map, or ``None``.
    """

    score: float
    raw_score: float | None
    referenced_sop_instance_uid: str
    referenced_sop_class_uid: str
    algorithm_name: str
    algorithm_version: str
    sop_instance_uid: str
    series_instance_uid: str
    out_of_distribution: bool = False
    anomaly_map_sop_instance_uid: str | None = None


def _load_header(source: Dataset | str | os.PathLike) -> Dataset:
    """The source image header (no pixel data), with absent type 2 Patient/Study attributes emptied."""
    if isinstance(source, Dataset):
        header = Dataset()
        for elem in source:
            if elem.tag.group != 0x7FE0:  # skip Pixel Data: only the header is evidence
                header.add(elem)
        header.file_meta = getattr(source, "file_meta", Dataset())
        name = "<dataset>"
    else:
        name = str(source)
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            msg = f"{name}: cannot read DICOM source image ({err})"
            raise DataError(msg) from None
    missing = [k for k in _REQUIRED_KEYWORDS if not header.get(k)]
    if missing:
        msg = f"{name}: cannot reference the source image in an SR, missing {', '.join(missing)}"
        raise DataError(msg)
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    for keyword, parse in _DATE_TIME_KEYWORDS.items():
        value = header.get(keyword)
        if value:
            try:
                parse(str(value))
            except ValueError:  # e.g. an anonymiser's hash in PatientBirthDate: drop, do not fail
                setattr(header, keyword, None)
    return header


def _algorithm(name: str, version: str, parameters: list[str] | None) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=parameters or None)


def build_score_sr(
    source: Dataset | str | os.PathLike,
    score: float,
    *,
    raw_score: float | None = None,
    out_of_distribution: bool = False,
    algorithm_name: str = "salad-med",
    algorithm_version: str = __version__,
    algorithm_parameters: list[str] | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 990,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    manufacturer: str = "salad-med",
    institution_name: str | None = None,
    anomaly_map: Dataset | str | os.PathLike | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build (not write) the Comprehensive SR holding the anomaly score of one source image.

    Args:
        source: the scored image as a pydicom Dataset or a path (only its header is used).
        score: normalised anomaly score (higher = more abnormal).
        raw_score: raw score, recorded as a second measurement when given.
        out_of_distribution: add the "Out of distribution" qualitative evaluation.
        algorithm_name: TID 4019 Algorithm Name.
        algorithm_version: TID 4019 Algorithm Version (default: the salad-med version).
        algorithm_parameters: optional TID 4019 Algorithm Parameters (e.g. ``["k=100", "mode=paper"]``).
        series_instance_uid: SR series UID (default: a new UID).
        series_number: SR Series Number.
        sop_instance_uid: SR SOP Instance UID (default: a new UID).
        instance_number: SR Instance Number.
        series_description: SR Series Description.
        manufacturer: Manufacturer of the "device" writing the SR.
        institution_name: optional Institution Name.
        anomaly_map: the image's anomaly map instance (Dataset or path, e.g. from
            :func:`salad_med.dicom.maps.write_map_segmentation`), referenced by the measurement group.

    Returns:
        The SR dataset, Patient/Study modules inherited from ``source``.

    Raises:
        DataError: ``source`` is unreadable or lacks the UIDs needed to reference it.
        ValueError: ``score`` or ``raw_score`` is not finite.
    """
    for label, value in (("score", score), ("raw_score", raw_score)):
        if value is not None and not math.isfinite(float(value)):
            msg = f"{label} must be a finite number, got {value!r}"
            raise ValueError(msg)
    with quiet_phi_warnings():
        header = _load_header(source)
    algorithm = _algorithm(algorithm_name, algorithm_version, algorithm_parameters)
    referenced = [hd.sr.SourceImageForMeasurement.from_source_image(header)]
    measurements = [hd.sr.Measurement(name=ANOMALY_SCORE, value=float(score), unit=NO_UNITS,
                                      algorithm_id=algorithm, referenced_images=referenced)]
    if raw_score is not None:
        measurements.append(hd.sr.Measurement(name=RAW_ANOMALY_SCORE, value=float(raw_score), unit=NO_UNITS,
                                              algorithm_id=algorithm, referenced_images=referenced))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_TRACKING_ID),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(INPUT_DISTRIBUTION, OUT_OF_DISTRIBUTION)]
        if out_of_distribution else None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[algorithm_name, algorithm_version]),
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=algorithm_version,
        ),
    )
    extra_evidence = []
    if anomaly_map is not None:
        with quiet_phi_warnings():
            map_header = _load_header(anomaly_map)
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=ANOMALY_MAP, referenced_sop_class_uid=map_header.SOPClassUID,
            referenced_sop_instance_uid=map_header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        extra_evidence.append(map_header)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURE,
        imaging_measurements=[group],
    )
    with quiet_phi_warnings():
        sr = _comprehensive_sr(header, report, extra_evidence=extra_evidence, series_instance_uid=series_instance_uid or generate_uid(),
                               series_number=series_number, sop_instance_uid=sop_instance_uid or generate_uid(),
                               instance_number=instance_number, manufacturer=manufacturer,
                               institution_name=institution_name)
    sr.SeriesDescription = series_description
    return sr


def _comprehensive_sr(header: Dataset, report: hd.sr.MeasurementReport, *, extra_evidence: list[Dataset] = (),
                      **kwargs) -> hd.sr.ComprehensiveSR:
    return hd.sr.ComprehensiveSR(
        evidence=[header, *extra_evidence],
        content=report[0],
        is_complete=True,
        is_final=False,
        is_verified=False,
        **kwargs,
    )


def write_score_sr(
    source: Dataset | str | os.PathLike,
    score: float,
    output_path: str | os.PathLike,
    algorithm_name: str = "salad-med",
    algorithm_version: str = __version__,
    **kwargs,
) -> Path:
    """Write the SR of one scored image atomically (temp file + rename); see :func:`build_score_sr`.

    Args:
        source: the scored image (pydicom Dataset or path).
        score: normalised anomaly score (higher = more abnormal).
        output_path: destination ``.dcm`` file; parent folders are created.
        algorithm_name: TID 4019 Algorithm Name.
        algorithm_version: TID 4019 Algorithm Version.
        **kwargs: forwarded to :func:`build_score_sr` (``raw_score``, ``series_instance_uid``, ...).

    Returns:
        ``output_path`` as a :class:`~pathlib.Path`.
    """
    sr = build_score_sr(source, score, algorithm_name=algorithm_name, algorithm_version=algorithm_version,
                        **kwargs)
    with atomic_path(output_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return Path(output_path)


def write_score_srs(scores, output_dir: str | os.PathLike, **kwargs) -> list[str]:
    """Write one SR per successfully scored DICOM row of a ``score_paths`` table (``salad-med score``).

    Rows whose ``status`` is not ``"ok"`` or whose ``source_path`` is not a DICOM file get no SR. An SR
    that cannot be written (e.g. a source without Study Instance UID) is logged (UIDs only) and skipped.

    Args:
        scores: DataFrame with ``image_id, source_path, score, raw_score, status`` (and ``ood``).
        output_dir: folder of ``<image_id>.dcm`` SRs (``image_id`` is the SOP Instance UID for DICOM).
        **kwargs: forwarded to :func:`write_score_sr` (``algorithm_name``, ``series_description``, ...).

    Returns:
        One entry per row: the SR path, or ``""``.
    """
    from preprocessing.readers import sniff_format
    from salad_med.log import get_logger

    log = get_logger("dicom_sr")
    out: list[str] = []
    for row in scores.itertuples(index=False):
        path = ""
        try:
            is_dicom = row.status == "ok" and sniff_format(row.source_path) == "dicom"
        except Exception:  # noqa: BLE001 - an unreadable source simply gets no SR
            is_dicom = False
        if is_dicom:
            raw = getattr(row, "raw_score", None)
            map_path = str(getattr(row, "map_path", "") or "")  # score --maps: the image's map instance
            target = Path(output_dir) / f"{row.image_id}.dcm"
            try:
                path = str(write_score_sr(row.source_path, float(row.score), target,
                                          raw_score=float(raw) if raw is not None and math.isfinite(raw) else None,
                                          out_of_distribution=bool(getattr(row, "ood", False)),
                                          anomaly_map=map_path if map_path.endswith(".dcm") else None, **kwargs))
            except (DataError, ValueError) as err:
                log.warning("no SR for %s: %s", row.image_id, err)
        out.append(path)
    return out


def _walk(items) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    return (seq[0].CodeValue, seq[0].CodingSchemeDesignator) if seq else None


def read_score_sr(path_or_dataset: Dataset | str | os.PathLike) -> ScoreReport:
    """Read the score, the referenced image and the algorithm back from a salad-med SR.

    Raises:
        DataError: the file is not a salad-med score SR.
    """
    ds = path_or_dataset if isinstance(path_or_dataset, Dataset) else pydicom.dcmread(path_or_dataset)
    name = getattr(ds, "filename", None) or "<dataset>"
    values: dict[tuple[str, str], float] = {}
    texts: dict[str, str] = {}
    codes_found: set[tuple[tuple[str, str], tuple[str, str]]] = set()
    ref: Dataset | None = None
    map_uid: str | None = None
    for item in _walk(ds.get("ContentSequence")):
        concept = _concept(item)
        if item.get("ValueType") == "NUM" and concept is not None:
            values[concept] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.get("ValueType") == "TEXT" and concept is not None and concept[1] == "DCM":
            texts.setdefault(concept[0], item.TextValue)
        elif item.get("ValueType") == "IMAGE" and concept == (ANOMALY_MAP.value, SALAD_SCHEME):
            map_uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif item.get("ValueType") == "IMAGE" and ref is None:
            ref = item.ReferencedSOPSequence[0]
        elif item.get("ValueType") == "CODE" and concept is not None and item.get("ConceptCodeSequence"):
            value = item.ConceptCodeSequence[0]
            codes_found.add((concept, (value.CodeValue, value.CodingSchemeDesignator)))
    key = (ANOMALY_SCORE.value, ANOMALY_SCORE.scheme_designator)
    if (_STUDY_SCORE_CODE, SALAD_SCHEME) in values:  # salad_med.dicom.study.STUDY_ANOMALY_SCORE
        msg = f"{name}: a salad-med study SR, not a per-image SR (read it with salad_med.dicom.study.read_study_sr)"
        raise DataError(msg)
    if key not in values or ref is None:
        msg = f"{name}: not a salad-med score SR (no {ANOMALY_SCORE.meaning!r} measurement or image reference)"
        raise DataError(msg)
    return ScoreReport(
        score=values[key],
        raw_score=values.get((RAW_ANOMALY_SCORE.value, RAW_ANOMALY_SCORE.scheme_designator)),
        referenced_sop_instance_uid=str(ref.ReferencedSOPInstanceUID),
        referenced_sop_class_uid=str(ref.ReferencedSOPClassUID),
        algorithm_name=texts.get("111001", ""),
        algorithm_version=texts.get("111003", ""),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        out_of_distribution=((INPUT_DISTRIBUTION.value, SALAD_SCHEME), (OUT_OF_DISTRIBUTION.value, SALAD_SCHEME))
        in codes_found,
        anomaly_map_sop_instance_uid=map_uid,
    )
