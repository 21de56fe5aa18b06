"""Radiograph readers: DICOM CR/DX (pydicom or SimpleITK) and PNG/JPEG (PIL), as MONAI ``ImageReader``s.

Every reader returns one 2-D image ``(H, W)`` (row-major, no axis swap) in *display* orientation
(bone bright) and a flat metadata dict. Files that cannot be turned into a single grey-level radiograph
raise :class:`~preprocessing.errors.ReadError` with a reason a person understands.

DICOM display transform (PS3.3 C.11.1 Modality LUT, C.11.2 VOI LUT, C.7.6.3.1.2 Photometric
Interpretation; https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.11.html):

1. Modality LUT: (0028,3000) *Modality LUT Sequence*, else (0028,1053) *Rescale Slope* and
   (0028,1052) *Rescale Intercept*.
2. VOI (``apply_voi=True``): (0028,3010) *VOI LUT Sequence*, else the first (0028,1050) *Window
   Center* / (0028,1051) *Window Width* with (0028,1056) *VOI LUT Function*.
3. (0028,0004) *Photometric Interpretation* ``MONOCHROME1`` is inverted within the output range of
   the previous step, so bone is bright in every output.

Refused: more than one frame ((0028,0008) *Number of Frames*), colour ((0028,0002) *Samples per
Pixel* > 1, RGB/YBR/PALETTE), objects without (7FE0,0010) *Pixel Data* and non-image SOP classes
(structured reports, encapsulated PDF/CDA, presentation states, waveforms), transfer syntaxes with no
installed decoder. Metadata kept: SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, PatientID,
Modality, BodyPartExamined, ViewPosition, PhotometricInterpretation, BitsStored, TransferSyntaxUID,
PixelSpacing (or ImagerPixelSpacing). PatientName and other identifying text are never read out.

Example:
    >>> from monai.transforms import LoadImage
    >>> img = LoadImage(reader=RadiographDicomReader(), image_only=True)("RG3_UNCR.dcm")  # (H, W)
    >>> arr, meta = read_radiograph("IMG0000019.jpg")  # (H, W) float32, dict
    >>> LoadRadiographd(keys="image")({"image": "RG3_UNCR.dcm"})["image"].shape  # (1, H, W)

See Also:
    :class:`monai.data.PydicomReader` (no MONOCHROME1 inversion, no VOI), :mod:`preprocessing.pipelines`.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.transforms import LoadImage, LoadImaged, MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep
from monai.utils.enums import PostFix

from preprocessing.errors import ReadError

__all__ = [
    "RadiographDicomReader",
    "SITKRadiographReader",
    "RadiographPILReader",
    "RadiographReader",
    "LoadRadiograph",
    "LoadRadiographd",
    "LoadRadiographD",
    "LoadRadiographDict",
    "READER_NAMES",
    "get_reader",
    "read_radiograph",
    "sniff_format",
    "dicom_display",
    "decode_dicom_pixels",
    "MIN_IMAGE_SIDE",
]

#: Reader names accepted by :func:`get_reader` (``PreprocessConfig.reader``).
READER_NAMES = ("auto", "pydicom", "sitk", "pil")
#: Images whose shorter side is below this are refused (a 1x1 "image" is a broken export).
MIN_IMAGE_SIDE = 8

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# SOP Class UID prefixes of objects that are not images (PS3.4 Annex B)
_NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document (PDF/CDA)",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.66": "a raw data / registration / segmentation object",
}
# (metadata key, DICOM keyword); PatientName is deliberately absent (PHI)
_DICOM_META = (
    ("sop_instance_uid", "SOPInstanceUID"),
    ("study_instance_uid", "StudyInstanceUID"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("sop_class_uid", "SOPClassUID"),
    ("patient_id", "PatientID"),
    ("modality", "Modality"),
    ("body_part_examined", "BodyPartExamined"),
    ("view_position", "ViewPosition"),
    ("photometric_interpretation", "PhotometricInterpretation"),
)


# ----------------------------------------------------------------------------------------- helpers
def _single_path(data: Sequence[str | os.PathLike] | str | os.PathLike) -> Path:
    names = ensure_tuple(data)
    if len(names) != 1:
        msg = f"radiograph readers read one file at a time, got {len(names)}: {list(names)[:3]}"
        raise ValueError(msg)
    return Path(names[0])


def _check_file(path: Path) -> int:
    """Raise a clear :class:`ReadError` for missing, non-regular or empty files; return the size."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ReadError(path, "file not found") from None
    except OSError as err:
        raise ReadError(path, f"cannot access file ({err.strerror or err})") from None
    if path.is_dir():
        raise ReadError(path, "is a directory, not an image file")
    if st.st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ReadError(path, "cannot read file (permission denied)")
    return st.st_size


def _head(path: Path, n: int = 132) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as err:
        raise ReadError(path, f"cannot read file ({err.strerror or err})") from None


def sniff_format(path: str | os.PathLike) -> str:
    """Identify a file by its content: ``"dicom"``, ``"png"``, ``"jpeg"``, ``"text"`` or ``"unknown"``.

    DICOM is recognised by the ``DICM`` marker after the 128-byte preamble, or (files without
    preamble) by a leading group 0x0002/0x0008 element; the file extension is not trusted.

    Raises:
        ReadError: missing, unreadable or empty file.
    """
    p = Path(path)
    _check_file(p)
    head = _head(p)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    # DICOM without preamble: first tag (0002,xxxx) or (0008,xxxx), little endian, with a VR or length
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] in (b"\x00\x00", b"\x01\x00",
                                                                                  b"\x05\x00", b"\x08\x00",
                                                                                  b"\x10\x00", b"\x16\x00"):
        return "dicom"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:128]):
        return "text"
    return "unknown"


def _spacing_meta(ds: Any) -> tuple[np.ndarray, str]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None:
            try:
                row, col = (float(v) for v in value)
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return np.array([row, col], dtype=np.float64), keyword
    return np.array([np.nan, np.nan], dtype=np.float64), ""


def _base_meta(arr_shape: tuple[int, int], spacing: np.ndarray) -> dict[str, Any]:
    """MONAI bookkeeping: spatial shape, 'no channel', and an affine scaled by the pixel spacing (mm)."""
    affine = np.eye(3, dtype=np.float64)
    if np.all(np.isfinite(spacing)):
        affine[0, 0], affine[1, 1] = spacing
    return {
        "spatial_shape": np.asarray(arr_shape, dtype=np.int64),
        "original_channel_dim": float("nan"),
        "affine": affine,
        "original_affine": affine.copy(),
        "orig_height": int(arr_shape[0]),
        "orig_width": int(arr_shape[1]),
        "pixel_spacing": spacing,
    }


def _check_size(path: Path, height: int, width: int, min_side: int) -> None:
    if min(height, width) < min_side:
        reason = f"image is only {width}x{height} pixels; at least {min_side}x{min_side} needed"
        raise ReadError(path, reason)


# ------------------------------------------------------------------------------------------- DICOM
def _first(value: Any, index: int = 0) -> float:
    """Value ``index`` of a multi-valued DICOM number (or the single value)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[min(index, len(value) - 1)])


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_range(ds: Any) -> tuple[float, float]:
    """Output range of the Modality LUT step (as pydicom's ``apply_windowing`` defines it)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        return 0.0, 2.0 ** int(seq[0].LUTDescriptor[2]) - 1
    lo, hi = _stored_range(ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def _saturated(arr: np.ndarray, lo: float, hi: float, min_inside: float = 0.005) -> bool:
    """True when fewer than ``min_inside`` of the pixels lie strictly inside ``(lo, hi)``."""
    sub = arr[::4, ::4]
    inside = np.count_nonzero((sub > lo) & (sub < hi))
    return inside < min_inside * sub.size


def _modality(arr: np.ndarray, ds: Any, modality_applied: bool) -> np.ndarray:
    """Modality LUT Sequence, else Rescale Slope/Intercept (float32), unless already applied."""
    from pydicom.pixels import apply_modality_lut

    if modality_applied:
        return arr
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0 or intercept != 0.0:
        return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return arr


def _voi_lut(arr: np.ndarray, ds: Any, index: int) -> tuple[np.ndarray, float]:
    """Apply VOI LUT ``index`` of (0028,3010); returns the values and the top of the LUT's output range.

    Raises:
        ValueError: the LUT is unusable (descriptor, data or shape), with the original error in words.
    """
    from pydicom.pixels import apply_voi

    try:
        item = ds.VOILUTSequence[min(index, len(ds.VOILUTSequence) - 1)]
        entries, _, bits = (int(v) for v in item.LUTDescriptor)
        if not 1 <= bits <= 16:
            msg = f"LUT Descriptor bits {bits} outside 1..16"
            raise ValueError(msg)
        ints = arr if np.issubdtype(arr.dtype, np.integer) else np.rint(arr).astype(np.int64)
        out = np.asarray(apply_voi(ints, ds, index=index))
        if out.shape != arr.shape:
            msg = f"LUT output shape {out.shape} != image {arr.shape}"
            raise ValueError(msg)
    except Exception as err:  # noqa: BLE001 - pydicom raises IndexError, struct.error, ... on broken LUTs
        detail = " ".join(str(err).split())[:120] or "no message"
        if isinstance(err, struct.error):
            msg = f"LUT Data does not match its LUT Descriptor ({detail})"
        else:
            msg = f"{type(err).__name__}: {detail}"
        raise ValueError(msg) from None
    return out, 2.0**bits - 1


def _voi(arr: np.ndarray, ds: Any, index: int, lo: float, hi: float) -> tuple[np.ndarray, str, float, float]:
    """VOI LUT Sequence, else window ``index`` (PS3.3 C.11.2); returns (array, kind, range lo, hi).

    A VOI LUT Sequence that cannot be applied (wrong descriptor, too little LUT data) falls back to the
    window, then to the full range; the kind says so: ``"window (VOI LUT Sequence unusable: ...)"`` or
    ``"none (VOI LUT Sequence unusable: ...; no window, full range)"``.
    """
    from pydicom.pixels import apply_windowing

    note = ""
    if ds.get("VOILUTSequence"):
        try:
            out, top = _voi_lut(arr, ds, index)
            return out, "voi_lut", 0.0, top
        except ValueError as err:
            note = f"VOI LUT Sequence unusable: {err}"
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return arr, (f"none ({note}; no window, full range)" if note else "none"), lo, hi
    kind = f"window ({note})" if note else "window"
    center = _first(ds.WindowCenter, index)
    width = _first(ds.WindowWidth, index)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if func in ("LINEAR", "LINEAR_EXACT") and width > (1 if func == "LINEAR" else 0):
        # C.11.2.1.2.1 in float32: the values of pydicom's apply_windowing, 5x faster
        if func == "LINEAR":
            center, width = center - 0.5, width - 1
        out = arr.astype(np.float32)
        out -= np.float32(center - width / 2)
        out *= np.float32((hi - lo) / width)
        np.clip(out, 0.0, np.float32(hi - lo), out=out)
        out += np.float32(lo)
        return out, kind, lo, hi
    if func == "SIGMOID" and width > 0:
        sub = ds.copy()
        sub.WindowCenter, sub.WindowWidth = center, width
        return apply_windowing(arr, sub), kind, lo, hi
    return arr, (f"none ({note}; window unusable, full range)" if note else "none"), lo, hi


def dicom_display(arr: np.ndarray, ds: Any, apply_voi: bool = True, voi_index: int = 0,
                  modality_applied: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored pixel values -> display values: Modality LUT, VOI LUT/window, MONOCHROME1 inversion.

    A window that clips (nearly) every pixel to one value (it was written for other data) is
    ignored, and ``voi`` says so.

    Args:
        arr: stored values ``(H, W)`` as decoded.
        ds: the pydicom ``Dataset`` (header) of the image.
        apply_voi: apply the VOI LUT Sequence, else the window ``voi_index`` (when present).
        voi_index: which of several VOI LUTs / windows to use.
        modality_applied: ``arr`` already went through Rescale Slope/Intercept (SimpleITK does that).

    Returns:
        ``(H, W)`` float32 with bone bright, and ``{"voi": "voi_lut"|"window"|"none"|... (a note in
        brackets when a VOI LUT Sequence was unusable and the window or the full range was used instead),
        "monochrome1_inverted": bool, "display_range": (lo, hi)}``.
    """
    values = _modality(arr, ds, modality_applied)
    lo, hi = _modality_range(ds)
    voi = "none"
    out = values
    if apply_voi:
        out, voi, vlo, vhi = _voi(values, ds, voi_index, lo, hi)
        if not voi.startswith("none") and _saturated(np.asarray(out), vlo, vhi):
            out, voi = values, f"none ({voi} saturates the image)"
        else:
            lo, hi = vlo, vhi
    out = np.asarray(out, dtype=np.float32)
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if inverted:
        out = np.float32(lo + hi) - out
    return np.ascontiguousarray(out), {"voi": voi, "monochrome1_inverted": inverted,
                                       "display_range": (float(lo), float(hi))}


@dataclass
class DicomRecord:
    """What :meth:`RadiographDicomReader.read` returns: the file and its pydicom dataset."""

    path: Path
    dataset: Any


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = _check_file(path)
    kind = sniff_format(path)
    if kind in ("png", "jpeg", "text"):
        raise ReadError(path, f"not a DICOM file (the content is {kind.upper() if kind != 'text' else 'text'})")
    force = kind == "dicom" or path.suffix.lower() in _DICOM_SUFFIXES
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=force)
        for w in caught:
            text = str(w.message).replace(f" in file {path}", "").replace(str(path), "the file")
            if "end of file" in text.lower() or "truncat" in text.lower():
                reason = f"truncated DICOM file ({size} bytes; {text.splitlines()[0][:100]})"
                raise ReadError(path, reason)
    except ReadError:
        raise
    except InvalidDicomError:
        raise ReadError(path, "not a DICOM file (no 'DICM' marker)") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        if isinstance(err, EOFError) or "end of file" in detail.lower() or "truncat" in detail.lower():
            reason = f"truncated DICOM file ({size} bytes; {detail})"
        else:
            reason = f"corrupt DICOM file ({detail})"
        raise ReadError(path, reason) from None
    if "PixelData" not in ds and ("SOPClassUID" not in ds and "Rows" not in ds):
        raise ReadError(path, "not a DICOM image (no SOP Class UID, no Pixel Data)")
    return ds


def _validate_dataset(path: Path, ds: Any, min_side: int, need_pixels: bool = True) -> None:
    """Refuse non-image objects, multi-frame, colour and too-small images (clear reasons)."""
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", "") or "")
    for prefix, what in _NON_IMAGE_SOP.items():
        if sop.startswith(prefix):
            reason = f"not an image: {what} ({UID(sop).name})"
            raise ReadError(path, reason)
    if need_pixels and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = f" ({UID(sop).name})" if sop else ""
        raise ReadError(path, f"DICOM object without Pixel Data{what}: not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ReadError(path, f"multi-frame DICOM ({frames} frames) is not supported; one radiograph per file")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        reason = (f"colour DICOM (Photometric Interpretation {photometric or '?'}, {samples} samples per "
                  "pixel) is not supported; radiographs are MONOCHROME1/MONOCHROME2")
        raise ReadError(path, reason)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(path, rows, cols, min_side)


def _check_decoder(path: Path, ds: Any) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    tsyntax = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        reason = f"transfer syntax {tsyntax.name} ({tsyntax}) has no pixel data decoder"
        raise ReadError(path, reason) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        reason = f"transfer syntax {tsyntax.name} ({tsyntax}) cannot be decoded: install {missing}"
        raise ReadError(path, reason)


def _dicom_meta(path: Path, ds: Any, reader_name: str) -> dict[str, Any]:
    spacing, source = _spacing_meta(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    meta = _base_meta((rows, cols), spacing)
    meta.update({key: str(ds.get(keyword, "") or "").strip() for key, keyword in _DICOM_META})
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")
    meta.update({
        "source_format": "dicom",
        "reader": reader_name,
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "transfer_syntax_uid": str(tsyntax or ""),
        "pixel_spacing_source": source,
    })
    return meta


class RadiographDicomReader(ImageReader):
    """DICOM CR/DX radiograph reader (pydicom 3 + pylibjpeg/pyjpegls/GDCM) with the display transform.

    Output: ``(H, W)`` float32, bone bright (see the module docstring for the DICOM attributes used).

    With ``reduce_to``, JPEG 2000 pixel data (transfer syntaxes 1.2.840.10008.1.2.4.90/.91) is decoded at
    a lower wavelet resolution level ``r`` (OpenJPEG through Pillow), the largest with
    ``2**r <= max(Rows, Columns) // reduce_to``: the long side stays ``>= reduce_to``, the code-blocks of
    the finer levels are never decoded (measured on the sample files: 3-4x less CPU per level), and each
    pixel is the level's low-pass: close to the mean of the ``2**r x 2**r`` file pixels around file pixel
    ``2**r * k`` (the wavelet filters are centred on even samples), i.e. up to ``(2**r - 1) / 2`` file pixels
    off the block centre the geometry trace assumes (half a pixel of the file at level 1).
    ``meta["decode_factor"] = 2**r``, ``orig_height``/``orig_width`` keep Rows/Columns, as for
    :class:`RadiographPILReader`. A signed or multi-component codestream, or one Pillow cannot decode, falls
    back to the full-size decode of pydicom.

    Args:
        apply_voi: apply the VOI LUT Sequence or the first window (default); ``False`` keeps the
            Modality-LUT values (still MONOCHROME1-inverted).
        voi_index: which VOI LUT / window to use when several are present.
        min_side: smallest accepted image side (pixels).
        reduce_to: decode JPEG 2000 at a reduced resolution whose long side stays ``>= reduce_to``
            (``None``: always full size; other transfer syntaxes are always decoded at full size).

    Raises:
        ReadError: from :meth:`read` / :meth:`get_data` with the file and the reason.
    """

    name = "pydicom"

    def __init__(self, apply_voi: bool = True, voi_index: int = 0, min_side: int = MIN_IMAGE_SIDE,
                 reduce_to: int | None = None) -> None:
        super().__init__()
        self.apply_voi = apply_voi
        self.voi_index = voi_index
        self.min_side = min_side
        self.reduce_to = reduce_to

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for ``.dcm``/``.dicom`` files and for any file whose content is DICOM."""
        for name in ensure_tuple(filename):
            p = Path(name)
            if p.suffix.lower() in _DICOM_SUFFIXES:
                continue
            try:
                if sniff_format(p) != "dicom":
                    return False
            except ReadError:
                return False
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> DicomRecord:
        """Parse and validate the header (non-image, multi-frame, colour, tiny, no decoder -> ReadError)."""
        path = _single_path(data)
        ds = _read_dataset(path)
        _validate_dataset(path, ds, self.min_side)
        _check_decoder(path, ds)
        return DicomRecord(path, ds)

    def _decode(self, record: DicomRecord) -> tuple[np.ndarray, bool]:
        """Stored values ``(H, W)`` and whether Rescale Slope/Intercept was already applied."""
        path, ds = record.path, record.dataset
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = decode_dicom_pixels(ds)
        except Exception as err:  # noqa: BLE001 - decoder plugins raise anything; report it in words
            detail = " ".join(str(err).split(" - ")[0].split())[:160] or type(err).__name__
            low = detail.lower()
            if "length" in low or "truncat" in low or "end of" in low or "expected" in low:
                reason = f"truncated or incomplete Pixel Data ({detail})"
            else:
                reason = f"Pixel Data cannot be decoded ({detail})"
            raise ReadError(path, reason) from None
        if arr.ndim != 2:
            reason = f"decoded pixel array has shape {arr.shape}, expected one grey-level frame"
            raise ReadError(path, reason)
        return arr, False

    def _decode_reduced(self, record: DicomRecord) -> tuple[np.ndarray, int] | None:
        """JPEG 2000 stored values at resolution level ``r`` and ``2**r``; ``None``: decode at full size."""
        ds = record.dataset
        tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if not self.reduce_to or tsyntax not in _J2K_SYNTAXES or int(ds.get("PixelRepresentation", 0) or 0):
            return None
        level = _reduction((int(ds.Rows), int(ds.Columns)), self.reduce_to).bit_length() - 1
        if level < 1:
            return None
        return _j2k_reduced(ds, level)

    def get_data(self, img: DicomRecord) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode, apply the display transform; return ``((H, W) float32, metadata)``."""
        reduced = self._decode_reduced(img)
        if reduced is None:
            (arr, modality_applied), factor = self._decode(img), 1
        else:
            (arr, factor), modality_applied = reduced, False
        out, info = dicom_display(arr, img.dataset, self.apply_voi, self.voi_index, modality_applied)
        meta = _dicom_meta(img.path, img.dataset, self.name)
        if factor > 1:  # as the PIL reader: the array is shrunk, orig_height/orig_width keep the file's size
            meta["spatial_shape"] = np.asarray(arr.shape, dtype=np.int64)
            meta["decode_factor"] = factor
        meta.update(info)
        meta["display_range"] = np.asarray(info["display_range"], dtype=np.float64)
        return out, meta


# the fastest pydicom decoding plugin per transfer syntax, measured on the sample files (CPU ms per image):
# JPEG-LS 2140x1760: pyjpegls 67, gdcm 102, pylibjpeg 239; JPEG lossless: gdcm 65, pylibjpeg 120 (identical
# pixels). pydicom's own order depends on what is installed (gdcm first, which is the slowest on JPEG 2000)
_PREFERRED_PLUGINS = {
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "gdcm"),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "gdcm"),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.57": ("gdcm",),  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70": ("gdcm",),  # JPEG lossless, process 14 selection value 1
    "1.2.840.10008.1.2.4.90": ("pylibjpeg",),  # JPEG 2000 lossless (full-size decodes)
    "1.2.840.10008.1.2.4.91": ("pylibjpeg",),  # JPEG 2000
}


def decode_dicom_pixels(ds: Any) -> np.ndarray:
    """The stored pixel values of ``ds``: ``ds.pixel_array`` with the fastest installed plugin of
    :data:`_PREFERRED_PLUGINS` for its transfer syntax; when that plugin fails on the file, pydicom's other
    plugins are tried as usual. The dataset's decoding options are left as they were (all plugins)."""
    from pydicom.pixels import get_decoder

    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if tsyntax in _PREFERRED_PLUGINS:
        available = get_decoder(tsyntax).available_plugins
        for plugin in (p for p in _PREFERRED_PLUGINS[tsyntax] if p in available):
            try:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            except Exception:  # noqa: BLE001 - the other plugins may read what this one cannot
                continue
            finally:
                ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


_J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # JPEG 2000 lossless only / lossy


def _j2k_header(frame: bytes) -> tuple[int, int, int, int] | None:
    """``(rows, columns, precision, decomposition levels)`` of a one-component unsigned JPEG 2000 codestream.

    Read from its main header (ISO/IEC 15444-1 A.5.1 SIZ, A.6.1 COD); ``None`` for anything else (several
    components, signed samples, an image offset, no COD marker).
    """
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 45:  # SOC, then SIZ
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[8:24])
    components, ssiz = struct.unpack(">HB", frame[40:43])
    if components != 1 or ssiz & 0x80 or x0 or y0:
        return None
    cod = frame.find(b"\xff\x52", 42, 4096)
    if cod < 0 or len(frame) < cod + 10:
        return None
    return ysiz, xsiz, (ssiz & 0x7F) + 1, frame[cod + 9]


def _j2k_reduced(ds: Any, level: int) -> tuple[np.ndarray, int] | None:
    """Decode the single JPEG 2000 frame of ``ds`` at resolution ``level`` (or the next coarser one Pillow
    can give) with Pillow; ``None`` when it is unfit or fails (the caller then decodes at full size).

    Pillow returns precisions 9-16 as ``I;16`` shifted left to 16 bits: shifted back here and clipped to
    the stored range (the low-pass of the 5/3 transform may overshoot it at sharp edges).
    """
    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - a broken encapsulation: the full-size path reports it
        return None
    header = _j2k_header(frame)
    if header is None or header[2] > 16:
        return None
    rows, cols, precision, levels = header
    # Pillow sizes a level as round(n / 2**r) where OpenJPEG gives ceil(n / 2**r) and then refuses the
    # mismatch ("broken data stream"): keep to levels where the two agree (always so for r = 1)
    level = min(level, levels)
    while level > 1 and any((n + (1 << (level - 1))) >> level != -(-n >> level) for n in (rows, cols)):
        level -= 1
    if level < 1:
        return None
    end = frame.rfind(b"\xff\xd9")  # EOC; OpenJPEG in Pillow refuses the even-length padding after it
    if end >= 0 and not frame[end + 2:].strip(b"\x00"):
        frame = frame[:end + 2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(frame), formats=["JPEG2000"])
            if im.mode not in ("L", "I;16"):
                return None
            im.reduce = level
            im.load()
    except Exception:  # noqa: BLE001 - any decoder trouble: the full-size path decodes or reports it
        return None
    arr = np.asarray(im)
    if arr.shape != (-(-rows >> level), -(-cols >> level)) or (rows, cols) != (int(ds.Rows), int(ds.Columns)):
        return None
    shift = (8 if im.mode == "L" else 16) - precision
    values = arr >> shift if shift > 0 else arr
    top = 2 ** int(ds.get("BitsStored") or precision) - 1
    return np.minimum(values, top).astype(arr.dtype), 1 << level


class SITKRadiographReader(RadiographDicomReader):
    """DICOM radiograph reader on SimpleITK (GDCM) with the same header checks and display transform.

    GDCM applies Rescale Slope/Intercept itself and turns MONOCHROME1 into MONOCHROME2 at decode
    time; that inversion is undone so :func:`dicom_display` sees Modality-LUT values as pydicom does.
    """

    name = "sitk"

    def _decode_reduced(self, record: DicomRecord) -> tuple[np.ndarray, int] | None:
        return None  # GDCM decodes at full size

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> DicomRecord:
        path = _single_path(data)
        ds = _read_dataset(path, stop_before_pixels=True)
        _validate_dataset(path, ds, self.min_side, need_pixels=False)
        return DicomRecord(path, ds)

    def _decode(self, record: DicomRecord) -> tuple[np.ndarray, bool]:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(record.path))
        try:
            arr = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError as err:
            detail = " ".join(str(err).split())[-160:]
            raise ReadError(record.path, f"SimpleITK/GDCM cannot decode the pixel data ({detail})") from None
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
        ds = record.dataset
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
            lo, hi = _modality_range(ds)  # undo GDCM's MONOCHROME1 -> MONOCHROME2 conversion
            arr = (lo + hi) - arr.astype(np.float64)
        return arr, not ds.get("ModalityLUTSequence")


# --------------------------------------------------------------------------------------- PNG/JPEG
@dataclass
class PILRecord:
    """What :meth:`RadiographPILReader.read` returns: the file and its loaded PIL image."""

    path: Path
    image: Any
    fmt: str
    orig_shape: tuple[int, int] = (0, 0)
    factor: int = 1
    scans: tuple[int, int] | None = None  # (decoded, in the file) when a progressive JPEG's first scans only


def _equal_channels(path: Path, rgb: np.ndarray, tolerance: float) -> None:
    """Raise when the colour channels of ``rgb (H, W, 3)`` differ materially (not a grey radiograph)."""
    sub = rgb[::4, ::4].astype(np.int16)
    diff = np.maximum(np.abs(sub[..., 0] - sub[..., 1]), np.abs(sub[..., 0] - sub[..., 2]))
    if float(np.mean(diff > 16)) > tolerance or float(diff.mean()) > 4.0:
        reason = (f"colour image: the RGB channels differ (mean difference {diff.mean():.1f} grey levels); "
                  "a radiograph has equal channels")
        raise ReadError(path, reason)


def _pil_gray(path: Path, im: Any, tolerance: float, factor: int = 1) -> tuple[np.ndarray, int]:
    """PIL image -> ``(H, W)`` uint8 / uint16 / float32 keeping the bit depth; returns (array, bits).

    With ``factor > 1`` the image is box-reduced by ``factor`` in PIL first (``Image.reduce``), so the
    full-resolution pixels are never copied into numpy.
    """
    mode = im.mode
    if mode == "1":
        im, mode = im.convert("L"), "L"
    elif mode in ("LA", "La"):
        im, mode = im.getchannel(0), "L"
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    elif mode in ("CMYK", "YCbCr", "RGBX", "RGBa"):
        im, mode = im.convert("RGB"), "RGB"
    if factor > 1:
        if mode.startswith("I;16"):
            im, mode = im.convert("I"), "I"
        im = im.reduce(factor)
    if mode == "L":
        return np.array(im), 8
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), 16
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16), 16
        return arr.astype(np.float32), 32
    if mode == "F":
        return np.array(im, dtype=np.float32), 32
    if mode in ("RGB", "RGBA"):
        _equal_channels(path, np.asarray(im.convert("RGB") if mode == "RGBA" else im), tolerance)
        return np.array(im.convert("L")), 8
    reason = f"unsupported PIL image mode {mode!r}"
    raise ReadError(path, reason)


def _reduction(size: tuple[int, int], reduce_to: int | None) -> int:
    """Integer box factor keeping the long side ``>= reduce_to`` (as :func:`preprocessing.geometry.box_factor`)."""
    if not reduce_to:
        return 1
    return max(1, max(size) // max(1, int(reduce_to)))


_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")  # a marker: not a stuffed 0x00, a restart or fill


def _jpeg_scan_end(data: bytes, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``pos`` (``-1``: none, truncated)."""
    m = _JPEG_MARKER.search(data, pos)
    return -1 if m is None else m.start()


def _jpeg_low_scans(data: bytes, scale: int, max_al: int = 2) -> tuple[bytes, int, int] | None:
    """The scans of a progressive JPEG that a decode at ``1/scale`` needs, as a JPEG stream of their own.

    A progressive JPEG (SOF2; ITU-T T.81 annex G) sends its DCT coefficients in scans: the DC terms first,
    then spectral bands of the AC terms (zig-zag ``Ss..Se``) at a coarse precision (point transform ``Al``)
    and refinements. Decoded at 1/4 or 1/8 scale, libjpeg's reduced inverse DCT (2x2 or 1x1 per block) is
    dominated by the DC and the lowest AC terms, which the DC scans and the first AC band (1-5 in libjpeg's
    script) hold. Every other segment is kept (tables, restart interval, ...) but only the scans within the
    band ``0..5``: ~20 % of a radiograph's bytes, so ~4x less entropy decoding, the costliest part of a
    decode (DCT scaling alone saves little: measured 32 against 35 ms for a 2304x2880 FracAtlas JPEG at
    1/4, with these scans 10 ms). (The AC 1-5 band is kept at 1/8 too: with the DC terms alone,
    libjpeg-turbo's block smoothing would move the DC terms themselves.)

    An approximation: the AC terms 1, 2 at precision ``Al <= max_al`` (multiples of ``2^Al`` quantisation
    steps), the finer terms missing (libjpeg's block smoothing estimates the lowest from the neighbouring
    DC terms). Measured against the 4x4 block means of the full decode on the 28 progressive FracAtlas
    JPEGs at 1/4: mean absolute error 0.2-0.6 grey levels (8-bit), 99th percentile <= 2.9, against 0.1-0.25
    and 0.6 for the 1/4 decode of every scan; a few pixels differ by up to ~50 at the edges of burned-in
    letters. At 1/8 the two decodes agree within one grey level (a phantom: mean 0.13). The coarser the
    file's quantisation, the larger the gap (a phantom at quality 90: 0.74 mean, 99th percentile 3 against
    the 1/4 decode of every scan; at quality 50: 1.1 and 7, where the file itself is off by more).

    Returns:
        ``(stream, kept scans, all scans)``, or ``None`` when the file is not a progressive Huffman JPEG,
        ``scale`` is below 4, the bands kept lack coefficients 1 and 2 at ``Al <= max_al``, every scan would
        be kept, or the marker structure is not complete (a truncated file: the full decode reports it).
    """
    if scale not in (4, 8) or data[:2] != b"\xff\xd8":
        return None
    out = [data[:2]]
    pos, n_scans, kept, progressive = 2, 0, 0, False
    comps: list[int] = []
    al: dict[tuple[int, int], int] = {}  # (component, coefficient) -> finest Al kept
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            out.append(data[pos:pos + 2])
            pos += 2
            continue
        if pos + 4 > len(data):
            return None
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker != 0xC2 or progressive:  # only one progressive Huffman frame
                return None
            progressive = True
            seg = data[pos + 4:end]
            if len(seg) < 6 or seg[5] == 0 or len(seg) < 6 + 3 * seg[5]:
                return None
            comps = [seg[6 + 3 * i] for i in range(seg[5])]
        if marker != 0xDA:
            out.append(data[pos:end])
            pos = end
            continue
        if not progressive:
            return None
        seg = data[pos + 4:end]
        ns = seg[0] if seg else 0
        if len(seg) < 4 + 2 * ns:
            return None
        ss, se, ah_al = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]
        stop = _jpeg_scan_end(data, end)
        if stop < 0:
            return None
        n_scans += 1
        scan = [(seg[1 + 2 * i], k) for i in range(ns) for k in range(ss, se + 1)]  # (component, coefficient)
        # a refinement (Ah > 0) only after a kept first scan of each of its coefficients (else it is dropped)
        if se <= 5 and (ah_al >> 4 == 0 or all(ck in al for ck in scan)):
            out.append(data[pos:stop])
            kept += 1
            for ck in scan:
                al[ck] = min(al.get(ck, 99), ah_al & 0x0F)
        pos = stop
    if not progressive or kept == n_scans:
        return None
    if any(al.get((c, k), 99) > max_al for c in comps for k in (1, 2)):
        return None
    out.append(b"\xff\xd9")
    return b"".join(out), kept, n_scans


class RadiographPILReader(ImageReader):
    """PNG/JPEG (and BMP/TIFF) radiograph reader on PIL that keeps the bit depth.

    Output ``(H, W)`` in the stored type: uint8 for 8-bit, uint16 for 16-bit PNG/TIFF, float32 for float
    TIFF; RGB/RGBA files with equal channels become one channel (alpha dropped); files whose channels
    differ materially are refused. No axis swap (unlike :class:`monai.data.PILReader`).

    With ``reduce_to`` the image is read already shrunk by the integer factor
    ``f = max(H, W) // reduce_to`` (long side stays ``>= reduce_to``): JPEGs are decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (the largest power of two dividing ``f``), the rest of ``f`` is a box
    reduction in PIL; ``meta["decode_factor"] = f`` and ``orig_height``/``orig_width`` keep the file's
    size (:class:`~preprocessing.geometry.BoxDownsample` records the step for the inverse).

    Args:
        min_side: smallest accepted image side (pixels).
        channel_tolerance: largest fraction of pixels whose channels may differ by > 16 grey levels
            (JPEG chroma noise).
        reduce_to: read a shrunk image whose long side stays ``>= reduce_to`` (``None``: full size).
        low_scans: a progressive JPEG read at 1/4 or 1/8 scale decodes only the scans that scale needs
            (:func:`_jpeg_low_scans`: ~4x faster; within a grey level at 1/8, ~0.5 on average at 1/4;
            ``meta["jpeg_scans"]`` is ``"kept/all"``, ``""`` for a full decode). ``False``: every scan.
    """

    name = "pil"

    def __init__(self, min_side: int = MIN_IMAGE_SIDE, channel_tolerance: float = 0.01,
                 reduce_to: int | None = None, low_scans: bool = True) -> None:
        super().__init__()
        self.min_side = min_side
        self.channel_tolerance = channel_tolerance
        self.reduce_to = reduce_to
        self.low_scans = low_scans

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for PNG/JPEG/BMP/TIFF names that are not DICOM by content."""
        for name in ensure_tuple(filename):
            p = Path(name)
            if p.suffix.lower() not in _PIL_SUFFIXES:
                return False
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> PILRecord:
        """Open and fully decode the file (truncated/corrupt data -> ReadError)."""
        from PIL import Image, UnidentifiedImageError

        path = _single_path(data)
        kind = sniff_format(path)
        if kind == "dicom":
            raise ReadError(path, "is a DICOM file; use the DICOM reader (reader='auto' or 'pydicom')")
        try:
            im = Image.open(path)
            fmt = (im.format or kind).lower()
            if getattr(im, "n_frames", 1) > 1:
                raise ReadError(path, f"multi-frame {fmt.upper()} ({im.n_frames} frames) is not supported")
            size = im.size
            factor = _reduction(size, self.reduce_to)
            scale = max(s_ for s_ in (1, 2, 4, 8) if factor % s_ == 0)
            scans = None
            if fmt == "jpeg" and scale > 1 and im.mode in ("L", "RGB"):
                low = _jpeg_low_scans(path.read_bytes(), scale) if self.low_scans and scale >= 4 else None
                if low is not None:  # a progressive JPEG: only the scans a 1/scale decode needs
                    im.close()
                    im = Image.open(io.BytesIO(low[0]))
                    scans = low[1:]
                # DCT-domain downscaling: libjpeg decodes directly at 1/scale (ceil sizes)
                im.draft(im.mode, (-(-size[0] // scale), -(-size[1] // scale)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
        except ReadError:
            raise
        except UnidentifiedImageError:
            if kind == "text":
                reason = f"not an image: the file contains text, not {path.suffix.lstrip('.').upper() or 'image'} data"
            else:
                reason = "not a recognised image format (unknown file signature)"
            raise ReadError(path, reason) from None
        except Image.DecompressionBombError as err:
            raise ReadError(path, f"image too large ({err})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            detail = " ".join(str(err).split())[:120] or type(err).__name__
            what = {"png": "PNG", "jpeg": "JPEG"}.get(kind, "image")
            if "truncat" in detail.lower() or isinstance(err, EOFError) or "broken" in detail.lower():
                reason = f"truncated {what} file: image data ends early ({detail})"
            else:
                reason = f"corrupt {what} data ({detail})"
            raise ReadError(path, reason) from None
        _check_size(path, size[1], size[0], self.min_side)
        return PILRecord(path, im, fmt, (size[1], size[0]), factor, scans)

    def get_data(self, img: PILRecord) -> tuple[np.ndarray, dict[str, Any]]:
        """Return ``((H, W) uint8|uint16|float32, metadata)``."""
        step = max(1, round(img.orig_shape[1] / img.image.size[0])) if img.factor > 1 else 1  # DCT scale used
        remaining = max(1, img.factor // step)
        arr, bits = _pil_gray(img.path, img.image, self.channel_tolerance, remaining)
        meta = _base_meta(arr.shape, np.array([np.nan, np.nan]))
        meta["orig_height"], meta["orig_width"] = img.orig_shape
        meta.update({
            "decode_factor": step * remaining,
            "jpeg_scans": f"{img.scans[0]}/{img.scans[1]}" if img.scans else "",
            "source_format": img.fmt,
            "reader": self.name,
            "bits_stored": bits,
            "pil_mode": img.image.mode,
            "photometric_interpretation": "",
            "monochrome1_inverted": False,
            "voi": "none",
        })
        return arr, meta


# ------------------------------------------------------------------------------------------- auto
class RadiographReader(ImageReader):
    """Picks the DICOM or the PIL reader from the file *content* (not only the extension).

    Args:
        dicom: ``"pydicom"`` (default) or ``"sitk"``: the DICOM backend.
        apply_voi, voi_index, min_side: see :class:`RadiographDicomReader`.
        reduce_to: see :class:`RadiographPILReader` and, for JPEG 2000 DICOM with ``dicom="pydicom"``,
            :class:`RadiographDicomReader` (other DICOM is read at full size).
        low_scans: see :class:`RadiographPILReader`.
    """

    name = "auto"

    def __init__(self, dicom: str = "pydicom", apply_voi: bool = True, voi_index: int = 0,
                 min_side: int = MIN_IMAGE_SIDE, reduce_to: int | None = None, low_scans: bool = True) -> None:
        super().__init__()
        if dicom == "sitk":
            self.dicom_reader: RadiographDicomReader = SITKRadiographReader(
                apply_voi=apply_voi, voi_index=voi_index, min_side=min_side)
        else:
            self.dicom_reader = RadiographDicomReader(apply_voi=apply_voi, voi_index=voi_index, min_side=min_side,
                                                      reduce_to=reduce_to)
        self.pil_reader = RadiographPILReader(min_side=min_side, reduce_to=reduce_to, low_scans=low_scans)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return self.dicom_reader.verify_suffix(filename) or self.pil_reader.verify_suffix(filename)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> tuple[ImageReader, Any]:
        path = _single_path(data)
        kind = sniff_format(path)
        if kind == "dicom" or (kind == "unknown" and path.suffix.lower() in _DICOM_SUFFIXES):
            reader: ImageReader = self.dicom_reader
        else:
            reader = self.pil_reader
        return reader, reader.read(path)

    def get_data(self, img: tuple[ImageReader, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        reader, record = img
        return reader.get_data(record)


_READERS: dict[str, type[ImageReader]] = {
    "auto": RadiographReader,
    "pydicom": RadiographDicomReader,
    "sitk": SITKRadiographReader,
    "pil": RadiographPILReader,
}


def get_reader(name: str | ImageReader = "auto", apply_voi: bool = True, **kwargs: Any) -> ImageReader:
    """A reader instance by name: ``"auto"`` (by content), ``"pydicom"``, ``"sitk"`` or ``"pil"``.

    Raises:
        ValueError: unknown name (the message lists the accepted ones).
    """
    if isinstance(name, ImageReader):
        return name
    key = str(name).lower()
    if key not in _READERS:
        msg = f"unknown reader {name!r}; choose one of {list(READER_NAMES)}"
        raise ValueError(msg)
    if key == "pil":
        return RadiographPILReader(**kwargs)
    if key in ("sitk", "pydicom"):
        kwargs.pop("low_scans", None)  # a JPEG reading option
    if key == "sitk":
        kwargs.pop("reduce_to", None)  # GDCM decodes at full size
    return _READERS[key](apply_voi=apply_voi, **kwargs)


def read_radiograph(path: str | os.PathLike, reader: str | ImageReader = "auto",
                    apply_voi: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one radiograph in display orientation.

    Args:
        path: DICOM, PNG or JPEG file (detected by content).
        reader: ``"auto"``, ``"pydicom"``, ``"sitk"``, ``"pil"`` or an ``ImageReader`` instance.
        apply_voi: apply the DICOM VOI LUT / first window.

    Returns:
        ``(H, W)`` float32 array (bone bright; PNG/JPEG keep their grey values, 0..255 or 0..65535)
        and the metadata dict (``filename_or_obj`` added).

    Raises:
        ReadError: the file is not a readable single-frame grey-level radiograph.
    """
    r = get_reader(reader, apply_voi=apply_voi)
    arr, meta = r.get_data(r.read(path))
    meta["filename_or_obj"] = os.fspath(path)
    return np.asarray(arr, dtype=np.float32), meta


# -------------------------------------------------------------------------------- MONAI loaders
class LoadRadiograph(LoadImage):
    """``LoadImage`` bound to one radiograph reader, without MONAI's fall-back to other readers.

    Returns a channel-first ``MetaTensor (1, H, W)`` (or ``(H, W)`` with ``ensure_channel_first=False``)
    in the reader's dtype (uint8/uint16 for PNG/JPEG, float32 for DICOM) unless ``dtype`` is given.
    A :class:`ReadError` from the reader propagates unchanged (MONAI's default readers are not
    registered, so nothing else silently reads a file ours refuses).

    Args:
        reader: a name from :data:`READER_NAMES` or an ``ImageReader``.
        apply_voi: DICOM VOI LUT / window.
        ensure_channel_first: add the channel axis.
        dtype: output dtype (``None`` keeps the stored type).
        image_only: return only the image (its metadata is in ``.meta``).
        reduce_to: read PNG/JPEG and JPEG 2000 DICOM already shrunk (see :class:`RadiographPILReader`,
            :class:`RadiographDicomReader`); follow with
            :class:`~preprocessing.geometry.BoxDownsample` of the same ``min_size`` to trace it.
        low_scans: a progressive JPEG read at 1/4 or 1/8 decodes only its first scans
            (see :class:`RadiographPILReader`); ``False``: every scan.
    """

    def __init__(self, reader: str | ImageReader = "auto", apply_voi: bool = True,
                 ensure_channel_first: bool = True, dtype: Any = None, image_only: bool = True,
                 reduce_to: int | None = None, low_scans: bool = True) -> None:
        # LoadImage.__init__ would instantiate every MONAI reader; set its attributes directly instead
        extra: dict[str, Any] = {"reduce_to": reduce_to} if reduce_to else {}
        if not low_scans:
            extra["low_scans"] = False
        self.radiograph_reader = get_reader(reader, apply_voi=apply_voi, **extra)
        self.auto_select = False
        self.image_only = image_only
        self.dtype = dtype
        self.ensure_channel_first = ensure_channel_first
        self.simple_keys = False
        self.pattern = None
        self.sep = "."
        self.expanduser = True
        self.readers = [self.radiograph_reader]

    def __call__(self, filename: Any, reader: ImageReader | None = None) -> Any:
        return super().__call__(filename, reader=reader or self.radiograph_reader)


class LoadRadiographd(LoadImaged):
    """Dictionary twin of :class:`LoadRadiograph`: ``{"image": path}`` -> ``{"image": (1, H, W)}``."""

    def __init__(self, keys: Any, reader: str | ImageReader = "auto", apply_voi: bool = True,
                 ensure_channel_first: bool = True, dtype: Any = None, allow_missing_keys: bool = False,
                 reduce_to: int | None = None, low_scans: bool = True) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._loader = LoadRadiograph(reader=reader, apply_voi=apply_voi, dtype=dtype,
                                      ensure_channel_first=ensure_channel_first, reduce_to=reduce_to,
                                      low_scans=low_scans)
        self.meta_keys = ensure_tuple_rep(None, len(self.keys))
        self.meta_key_postfix = ensure_tuple_rep(PostFix.meta(), len(self.keys))
        self.overwriting = False


LoadRadiographD = LoadRadiographDict = LoadRadiographd
