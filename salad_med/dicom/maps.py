"""DICOM output of an anomaly map: a fractional Segmentation referencing the scored image.

One :dcm:`Segmentation <part03/sect_A.51.html>` instance per scored DICOM image (``salad-med score
--maps``), written with highdicom:

* ``SegmentationType = FRACTIONAL``, ``SegmentationFractionalType = PROBABILITY``, 8-bit (stored
  0-255 = fraction 0-1), one segment, one frame on the **source image's own pixel grid** (Rows x Columns:
  the map is mapped back with the inverse preprocessing before it is written);
* the fraction is the map **relative to its own maximum** (negative values, where hiding a region
  *raises* the score, are clipped to 0): it says *where* in this image, not *how abnormal* the image is
  (that is the SR's score). The scale (the map value stored as 1.0, in raw-score units for occlusion
  maps) and the map kind are in ``ContentDescription``, e.g. ``"occlusion map; 1.0 = 0.0123"``;
* segment: category ``(49755003, SCT, "Morphologically Abnormal Structure")``, type
  ``(1005, 99SALAD, "Anomaly map")`` (:data:`salad_med.dicom.sr.ANOMALY_MAP`), algorithm type ``AUTOMATIC``
  with the algorithm name/version;
* Patient and Study modules inherited from the source image by highdicom (Source Image Sequence /
  Derivation Image Sequence reference it); a new Series (default number 991, description
  ``"SALAD anomaly map - not for clinical use"``).

Why not a Parametric Map: highdicom 0.28 cannot build one from a single-frame projection radiograph
without a patient coordinate system (its dimension index for that case expects Frame Label values the
Parametric Map frames do not get); a fractional Segmentation carries the same map at 8 bits.

Example:
    >>> write_map_segmentation("image.dcm", original_map, "out/maps/image.dcm", kind="occlusion")
    >>> read_map_segmentation("out/maps/image.dcm").fraction.shape   # (Rows, Columns)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from preprocessing.atomic import atomic_path
from salad_med import __version__
from salad_med.dicom.sr import ANOMALY_MAP, _load_header, quiet_phi_warnings
from salad_med.errors import DataError

__all__ = ["MAP_SERIES_DESCRIPTION", "MAP_LEVELS", "MapReport", "build_map_segmentation",
           "write_map_segmentation", "read_map_segmentation", "map_fraction"]

MAP_SERIES_DESCRIPTION = "SALAD anomaly map - not for clinical use"
#: Stored levels of the fraction (Maximum Fractional Value).
MAP_LEVELS = 255
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_DESCRIPTION = re.compile(r"^(?P<kind>\w+) map; 1\.0 = (?P<scale>[-+0-9.eEinfa]+)$")


@dataclass(frozen=True)
class MapReport:
    """What :func:`read_map_segmentation` finds in a salad-med map.

    Attributes:
        fraction: (Rows, Columns) float32 in [0, 1] (the stored levels / :data:`MAP_LEVELS`).
        scale: the map value stored as 1.0 (raw-score units for occlusion maps).
        kind: the map kind (``occlusion``, ``reconstruction``, ``native``).
        referenced_sop_instance_uid: the source image.
        sop_instance_uid, series_instance_uid, study_instance_uid: of the map itself.
    """

    fraction: np.ndarray
    scale: float
    kind: str
    referenced_sop_instance_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def map_fraction(amap: Any) -> tuple[np.ndarray, float]:
    """``(H, W)`` map -> (fraction in [0, 1] relative to the map's maximum, that maximum).

    Negative values are clipped to 0; a map without a positive value gives zeros and scale 0.

    Raises:
        ValueError: not 2-D, or NaN/infinite values.
    """
    arr = np.asarray(amap, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"anomaly map must be 2-D (Rows, Columns), got shape {arr.shape}"
        raise ValueError(msg)
    if not np.isfinite(arr).all():
        msg = "anomaly map contains NaN or infinity"
        raise ValueError(msg)
    top = float(arr.max(initial=0.0))
    if top <= 0.0:
        return np.zeros(arr.shape, dtype=np.float32), 0.0
    return np.clip(arr / top, 0.0, 1.0).astype(np.float32), top


def build_map_segmentation(
    source: Dataset | str | os.PathLike,
    amap: Any,
    *,
    kind: str = "occlusion",
    algorithm_name: str = "salad-med",
    algorithm_version: str = __version__,
    series_instance_uid: str | None = None,
    series_number: int = 991,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_description: str = MAP_SERIES_DESCRIPTION,
    manufacturer: str = "salad-med",
) -> hd.seg.Segmentation:
    """Build (not write) the fractional Segmentation holding the anomaly map of one source image.

    Args:
        source: the scored image (pydicom Dataset or path; only its header is used).
        amap: (Rows, Columns) anomaly map on the source's pixel grid (higher = more abnormal).
        kind: map kind recorded in ``ContentDescription``.
        algorithm_name, algorithm_version: the segment's algorithm identification.
        series_instance_uid, sop_instance_uid: default new UIDs.
        series_number, instance_number, series_description, manufacturer: of the new instance.

    Raises:
        DataError: ``source`` is unreadable, lacks the UIDs to reference it, or is not the map's grid.
        ValueError: ``amap`` is not 2-D or not finite.
    """
    with quiet_phi_warnings():
        header = _load_header(source)
    name = str(source) if not isinstance(source, Dataset) else "<dataset>"
    frac, scale = map_fraction(amap)
    grid = (int(header.get("Rows", 0)), int(header.get("Columns", 0)))
    if int(header.get("NumberOfFrames", 1) or 1) != 1 or frac.shape != grid:
        msg = f"{name}: anomaly map of shape {frac.shape} does not fit the single-frame {grid[0]}x{grid[1]} image"
        raise DataError(msg)
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, version=algorithm_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="anomaly map",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=ANOMALY_MAP, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    with quiet_phi_warnings():
        seg = hd.seg.Segmentation(
            source_images=[header], pixel_array=frac, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=[segment], series_instance_uid=series_instance_uid or hd.UID(),
            series_number=series_number, sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number, manufacturer=manufacturer, manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version, device_serial_number="0",
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, max_fractional_value=MAP_LEVELS,
            content_description=f"{kind} map; 1.0 = {scale:.6g}"[:64], content_label="ANOMALY_MAP")
    seg.SeriesDescription = series_description
    return seg


def write_map_segmentation(source: Dataset | str | os.PathLike, amap: Any, output_path: str | os.PathLike,
                           **kwargs: Any) -> Path:
    """Write the map of one image atomically; see :func:`build_map_segmentation` for ``kwargs``."""
    seg = build_map_segmentation(source, amap, **kwargs)
    with atomic_path(output_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(output_path)


def read_map_segmentation(path_or_dataset: Dataset | str | os.PathLike) -> MapReport:
    """Read a salad-med map back with pydicom (fraction, scale, kind and the referenced image).

    Raises:
        DataError: not a fractional Segmentation written by :func:`write_map_segmentation`.
    """
    ds = path_or_dataset if isinstance(path_or_dataset, Dataset) else pydicom.dcmread(path_or_dataset)
    name = getattr(ds, "filename", None) or "<dataset>"
    match = _DESCRIPTION.match(str(ds.get("ContentDescription", "")))
    segs = ds.get("SegmentSequence") or []
    prop = segs[0].SegmentedPropertyTypeCodeSequence[0] if segs else None
    if (ds.get("SOPClassUID") != _SEGMENTATION_STORAGE or ds.get("SegmentationType") != "FRACTIONAL"
            or match is None or prop is None or (prop.CodeValue, prop.CodingSchemeDesignator)
            != (ANOMALY_MAP.value, ANOMALY_MAP.scheme_designator)):
        msg = f"{name}: not a salad-med anomaly map (fractional Segmentation with an 'Anomaly map' segment)"
        raise DataError(msg)
    levels = float(ds.get("MaximumFractionalValue", MAP_LEVELS))
    frac = np.asarray(ds.pixel_array, dtype=np.float32).reshape(int(ds.Rows), int(ds.Columns)) / levels
    scale = float(match.group("scale"))
    return MapReport(fraction=frac, scale=scale if math.isfinite(scale) else float("nan"), kind=match.group("kind"),
                     referenced_sop_instance_uid=str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID),
                     sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                     study_instance_uid=str(ds.StudyInstanceUID))
