"""Radiograph intensity transforms: percentile window to [0, 1] and polarity (bright background) fix.

Both are MONAI array transforms for one channel-first image ``(C, H, W)`` with dictionary twins that
add no maths (``NormalizeRadiographd``, ``FixPolarityd``). They return the caller's array type
(numpy, torch or ``MetaTensor``); on a ``MetaTensor`` they record what they did in ``.meta``:
``norm_low``/``norm_high`` (the window in input units) and ``inverted`` (polarity flipped).

Example:
    >>> x = FixPolarity()(img)          # bright-background PNG -> bone bright, x.meta["inverted"]
    >>> y = NormalizeRadiograph(1, 99)(x)  # float32 in [0, 1]

See Also:
    :mod:`preprocessing.readers` (DICOM MONOCHROME1 is inverted there, from the header),
    :mod:`preprocessing.pipelines`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

__all__ = [
    "NormalizeRadiograph",
    "NormalizeRadiographd",
    "NormalizeRadiographD",
    "NormalizeRadiographDict",
    "FixPolarity",
    "FixPolarityd",
    "FixPolarityD",
    "FixPolarityDict",
    "robust_percentiles",
    "background_is_bright",
]


def robust_percentiles(img: Any, q: tuple[float, float], max_samples: int | None = 262_144) -> tuple[float, float]:
    """Percentiles ``q`` (in %) of all values of ``img``, from a regular sub-grid of ``<= max_samples``.

    Args:
        img: numpy array or tensor, any shape ``(C, H, W)``/``(H, W)``.
        q: two percentiles in [0, 100].
        max_samples: subsample spatially with one stride so that at most this many pixels are used
            (a regular grid keeps the estimate deterministic); ``None`` = exact.
    """
    arr = convert_data_type(img, np.ndarray)[0]
    if max_samples is not None and arr.size > max_samples and arr.ndim >= 2:
        stride = int(np.ceil(np.sqrt(arr.size / max_samples)))
        arr = arr[..., ::stride, ::stride]
    lo, hi = np.percentile(arr, q)
    return float(lo), float(hi)


class NormalizeRadiograph(Transform):
    """Map the ``[lower, upper]`` percentile window of an image linearly to ``[0, 1]`` (float32).

    Values outside the window are clipped (with ``clip=True``). A constant image (window of zero
    width) becomes all zeros, with ``meta["constant_image"] = True``.

    Args:
        lower: low percentile (%), e.g. 1.
        upper: high percentile (%), e.g. 99.
        clip: clip to ``[0, 1]``.
        max_samples: pixels used to estimate the percentiles (see :func:`robust_percentiles`).
        dtype: output dtype.

    Raises:
        ValueError: ``not 0 <= lower < upper <= 100``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, lower: float = 1.0, upper: float = 99.0, clip: bool = True,
                 max_samples: int | None = 262_144, dtype: Any = np.float32) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            msg = f"NormalizeRadiograph: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
            raise ValueError(msg)
        self.lower = float(lower)
        self.upper = float(upper)
        self.clip = clip
        self.max_samples = max_samples
        self.dtype = dtype

    def __call__(self, img: Any) -> Any:
        """``img`` ``(C, H, W)`` -> same shape, ``dtype`` in [0, 1]."""
        lo, hi = robust_percentiles(img, (self.lower, self.upper), self.max_samples)
        constant = not hi > lo
        if isinstance(img, torch.Tensor):
            x = img.as_tensor() if isinstance(img, MetaTensor) else img
            out = x.to(torch.float32)
            out = torch.zeros_like(out) if constant else (out - lo) * (1.0 / (hi - lo))
            if self.clip:
                out = out.clamp_(0.0, 1.0)
        else:
            out = np.asarray(img, dtype=np.float32)
            out = np.zeros_like(out) if constant else (out - np.float32(lo)) * np.float32(1.0 / (hi - lo))
            if self.clip:
                np.clip(out, 0.0, 1.0, out=out)
        out = convert_to_dst_type(out, img, dtype=self.dtype)[0]
        if isinstance(out, MetaTensor):
            out.meta["norm_low"], out.meta["norm_high"] = lo, hi
            out.meta["constant_image"] = constant
        return out


def background_is_bright(img: Any, border: float = 0.05, threshold: float = 0.7,
                         max_samples: int | None = 65_536) -> bool:
    """Whether the image frame is mostly bright (a negative: background white, bone dark).

    The median of the outer ``border`` frame, placed in the image's 1-99 % window, is compared with
    ``threshold``. Correctly oriented radiographs have a dark (air) frame; collimator shutters and
    bodies that fill the field make the frame bright in places, so the threshold is high: on the 300
    FracAtlas radiographs the largest value is 0.64 (no false flip), their negatives are detected when
    it is < 0.3 (95 % of them).

    Args:
        img: ``(C, H, W)`` or ``(H, W)`` array/tensor (only channel 0 is used).
        border: frame width as a fraction of the shorter side.
        threshold: decision level in [0, 1] of the 1-99 % window.
        max_samples: pixels used for the window (see :func:`robust_percentiles`).
    """
    arr = convert_data_type(img, np.ndarray)[0]
    arr = arr[0] if arr.ndim == 3 else arr
    h, w = arr.shape[-2:]
    b = max(1, int(round(border * min(h, w))))
    if 2 * b >= min(h, w):
        return False
    lo, hi = robust_percentiles(arr, (1.0, 99.0), max_samples)
    if not hi > lo:
        return False
    frame = np.concatenate([arr[:b].ravel(), arr[-b:].ravel(), arr[b:-b, :b].ravel(), arr[b:-b, -b:].ravel()])
    return (float(np.median(frame)) - lo) / (hi - lo) > threshold


class FixPolarity(Transform):
    """Invert PNG/JPEG radiographs stored as negatives (bright background), so bone is bright.

    Detection: :func:`background_is_bright`. Inversion keeps the dtype: ``max - x`` for integers
    (``max`` of the dtype, 255 or 65535), ``(min + max) - x`` for floats. Images whose metadata say
    they come from DICOM (``meta["source_format"] == "dicom"``) are left alone: their polarity is
    known from Photometric Interpretation (see :class:`~preprocessing.readers.RadiographDicomReader`).
    On a ``MetaTensor`` the decision is stored in ``meta["inverted"]``.

    Args:
        border: frame width (fraction of the shorter side).
        threshold: decision level in the 1-99 % window (0.7: prefer "not inverted" when unsure).
        skip_dicom: leave DICOM-sourced images unchanged.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, border: float = 0.05, threshold: float = 0.7, skip_dicom: bool = True) -> None:
        self.border = border
        self.threshold = threshold
        self.skip_dicom = skip_dicom

    def __call__(self, img: Any) -> Any:
        """``img`` ``(C, H, W)`` -> same shape and dtype, inverted when its background is bright."""
        meta = img.meta if isinstance(img, MetaTensor) else {}
        is_dicom = str(meta.get("source_format", "")).lower() == "dicom"
        invert = not (self.skip_dicom and is_dicom) and background_is_bright(img, self.border, self.threshold)
        out = self._invert(img) if invert else img
        if isinstance(out, MetaTensor):
            if out is img:  # a new MetaTensor on the same pixels (left as they are): the input's meta untouched
                out = MetaTensor(img.as_tensor(), meta=dict(img.meta), applied_operations=list(img.applied_operations))
            out.meta["inverted"] = bool(invert)
        return out

    @staticmethod
    def _invert(img: Any) -> Any:
        data = img.as_tensor() if isinstance(img, MetaTensor) else img
        if isinstance(data, torch.Tensor):
            if data.dtype.is_floating_point:
                ref = data.min() + data.max()
            else:
                ref = torch.iinfo(data.dtype).max
            out = ref - data
        else:
            ref = np.iinfo(data.dtype).max if np.issubdtype(data.dtype, np.integer) else data.min() + data.max()
            out = (ref - data).astype(data.dtype, copy=False)
        return convert_to_dst_type(out, img, dtype=data.dtype)[0]


class NormalizeRadiographd(MapTransform):
    """Dictionary twin of :class:`NormalizeRadiograph` (same arguments, plus ``keys``)."""

    backend = NormalizeRadiograph.backend

    def __init__(self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.0, clip: bool = True,
                 max_samples: int | None = 262_144, dtype: Any = np.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeRadiograph(lower, upper, clip, max_samples, dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


class FixPolarityd(MapTransform):
    """Dictionary twin of :class:`FixPolarity` (same arguments, plus ``keys``)."""

    backend = FixPolarity.backend

    def __init__(self, keys: KeysCollection, border: float = 0.05, threshold: float = 0.7,
                 skip_dicom: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fixer = FixPolarity(border, threshold, skip_dicom)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.fixer(d[key])
        return d


NormalizeRadiographD = NormalizeRadiographDict = NormalizeRadiographd
FixPolarityD = FixPolarityDict = FixPolarityd
