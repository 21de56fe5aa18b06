"""X-ray carrier (collimated field / film carrier) detection and cropping.

A radiograph often shows the edge of what was imaged: a film or cassette photographed on a light box
(MURA), a collimated field with unexposed (bright) shutters, or a detector field border. MURA-style
preprocessing crops to that carrier. The lab's method (blur, threshold sweep, polygon approximation,
convex quadrilaterals with max ``|cos(corner)| < 0.45``) "finds" carriers in most radiographs that
have none, and its crops cut anatomy away. This detector instead demands *evidence* for every side
and prefers "no carrier" when unsure:

1. Work on a box-downsampled copy (long side ``<= work_size``, default 256), Gaussian-smoothed.
2. Candidate straight lines: Canny edges + Hough transform (``num_peaks`` strongest local maxima),
   restricted to lines within ``max_rotation`` degrees of the image axes (carriers are
   near-rectangular, rotated a little).
3. Each candidate is refined to sub-pixel accuracy (the half-way crossing of across-line profiles,
   robust line fit) and tested as a carrier *side* with its exterior on one side of the line:

   * **straight step edge**: the step lies within ``edge_tolerance`` px of the line on
     ``>= min_coverage`` of its evidenced segment (samples where a marker lies on the border do not
     count), and its spread about the line is ``<= max_residual`` px (or twice the position noise):
     skin and bone outlines curve smoothly, carrier borders are ruled;
   * **uniform exterior**: around a gentle plane trend, ``>= min_homogeneity`` of the exterior
     half-plane is within a noise-scaled tolerance; compact burned-in markers (L/R letters, text
     boxes) are tolerated, anything else is clutter. The border's own penumbra is compared depth by
     depth (a soft collimator edge varies across, not along, the border);
   * **clear contrast**: exterior and interior differ by ``>= min_contrast`` and by two tolerances;
   * **never cut anatomy**: no non-marker structure beyond the border touches it, and no bone-like
     (bright and textured) structure lies beyond it. An exterior thinner than 2 % of the image is
     not worth a cut and is ignored.

4. Accepted sides must share one rotation (sides parallel or perpendicular within
   ``angle_tolerance``); per slot (left/right/top/bottom) the outermost is kept. Every side must be
   *closed*: each end of its evidenced segment reaches the frame or a corner with a perpendicular
   border (a straight step, even one whose exterior failed a test). Where the evidence stops in mid
   image the line was a limb's or a bone's outline, not a carrier. Missing sides (carrier partly out
   of frame, or a field bounded by the image border) are placed just outside the image. The carrier
   must keep ``>= min_area`` of the image.

Cropping (:class:`CropToCarrier`) uses the axis-aligned bounding box of the carrier polygon clipped
to the image (no resampling, exactly invertible by padding back); for a rotated carrier the box keeps
small exterior corner triangles, whose polygon (in crop coordinates) is stored in the metadata so that
:mod:`preprocessing.segmentation` can ignore them.

Example:
    >>> res = detect_carrier(img)          # img (H, W) float in [0, 1], bone bright
    >>> res.found, res.polygon, res.box    # (4, 2) (x, y) corners, (y0, y1, x0, x1)
    >>> crop = CropToCarrier()(img[None])  # (1, h, w) MetaTensor, crop.meta["carrier_found"]

See Also:
    :mod:`preprocessing.segmentation` (body-part mask), :mod:`preprocessing.pipelines`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Crop, InvertibleTransform, MapTransform
from monai.utils import convert_data_type
from scipy import ndimage as ndi
from skimage import feature as _skfeature
from skimage.filters import threshold_yen
from skimage.transform import hough_line

from preprocessing.kernels import nearest_rise, profiles
from preprocessing.morphology import gaussian, label, max_filter, min_filter

__all__ = [
    "CarrierSide",
    "CarrierResult",
    "detect_carrier",
    "work_copy",
    "polygon_mask",
    "CropToCarrier",
    "CropToCarrierd",
    "CropToCarrierD",
    "CropToCarrierDict",
]

_SLOTS = ("left", "right", "top", "bottom")
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


# ------------------------------------------------------------------------------------ helpers
def work_copy(image: np.ndarray, work_size: int, reduce: str = "mean") -> tuple[np.ndarray, float, float]:
    """Box-downsample ``image (H, W)`` so that its long side is ``<= work_size`` (cheaply).

    An integer factor ``f = step * block`` is used: every ``step``-th row/column is read and
    ``block x block`` groups of those are averaged (``block`` ~ 3), so a 2880x2304 image costs a few ms.
    Edge blocks are padded by replication.

    Args:
        image: (H, W) float array.
        work_size: maximal long side of the copy.
        reduce: ``"mean"`` of each block, or ``"max"`` (thin bright lines keep their full brightness).

    Returns:
        ``(small (h, w) float32, factor, offset)``: pixel centre ``i`` of the copy lies at
        ``factor * i + offset`` in the input (same for rows and columns).
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    f = max(1, math.ceil(max(h, w) / max(int(work_size), 8)))
    if f == 1:
        return img, 1.0, 0.0
    step = max(1, f // 3)
    block = math.ceil(f / step)
    sub = img[::step, ::step]
    hs, ws = math.ceil(sub.shape[0] / block) * block, math.ceil(sub.shape[1] / block) * block
    if (hs, ws) != sub.shape:
        sub = np.pad(sub, ((0, hs - sub.shape[0]), (0, ws - sub.shape[1])), mode="edge")
    small = block_reduce(sub, block, np.maximum if reduce == "max" else np.add)
    if reduce != "max":
        small *= np.float32(1.0 / (block * block))
    factor = float(step * block)
    return small, factor, step * (block - 1) / 2.0


def block_reduce(a: np.ndarray, block: int, combine: Any = np.add) -> np.ndarray:
    """``combine`` (``np.add`` or ``np.maximum``) over the ``block x block`` blocks of ``a (H, W)``, both sides
    multiples of ``block``: rows then columns, one strided slice per offset in the block. The same values,
    added in the same order, as reductions over reshaped axes, 4-10x faster (numpy reduces a short axis
    slowly)."""
    rows = a[0::block].copy()
    for k in range(1, block):
        combine(rows, a[k::block], out=rows)
    out = rows[:, 0::block].copy()
    for k in range(1, block):
        combine(out, rows[:, k::block], out=out)
    return out


def single_channel(img: Any, name: str) -> np.ndarray:
    """The ``(H, W)`` numpy plane of a channel-first ``(1, H, W)`` image (array or tensor).

    Raises:
        ValueError: ``img`` is not ``(1, H, W)``; the message starts with ``name``.
    """
    if len(img.shape) != 3 or img.shape[0] != 1:
        msg = f"{name}: expected a (1, H, W) image, got shape {tuple(img.shape)}"
        raise ValueError(msg)
    return convert_data_type(img, np.ndarray)[0][0]


def plane_2d(image: Any, name: str) -> np.ndarray:
    """The ``(H, W)`` numpy plane of an ``(H, W)`` or ``(1, H, W)`` image (array or tensor).

    Raises:
        ValueError: any other shape; the message starts with ``name``.
    """
    arr = convert_data_type(image, np.ndarray)[0]
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        msg = f"{name}: expected an (H, W) or (1, H, W) image, got shape {tuple(arr.shape)}"
        raise ValueError(msg)
    return arr


def finite(image: np.ndarray) -> np.ndarray:
    """``image`` as float32, NaN/inf replaced like ``np.nan_to_num`` (no copy when already finite float32)."""
    arr = np.asarray(image).astype(np.float32, copy=False)
    return arr if np.isfinite(arr).all() else np.nan_to_num(arr)


try:  # the non-maximum suppression of scikit-image's Canny (a compiled kernel of its own, not public API)
    from skimage.feature._canny_cy import _nonmaximum_suppression_bilinear
except ImportError:  # pragma: no cover - another scikit-image layout: its public canny is used
    _nonmaximum_suppression_bilinear = None


@functools.lru_cache(maxsize=16)
def _canny_bleed_over(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """scikit-image's Canny normalisation for its ``constant`` mode: the Gaussian of an all-ones image (+ eps),
    float32 (the same for every image of a shape: computed once)."""
    out = ndi.gaussian_filter(np.ones(shape, dtype=np.float32), sigma, mode="constant", cval=0.0, truncate=4.0)
    out += np.finfo(np.float32).eps
    out.flags.writeable = False
    return out


def _sobel(x: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.ndimage.sobel(x, axis)`` of a float32 image (``reflect`` borders), the same values ~2x faster:
    the derivative ``[-1, 0, 1]`` along ``axis`` rounded to float32 (scipy stores it so), then ``[1, 2, 1]``
    across summed in float64 and rounded once, as scipy's double accumulator does."""
    p = np.pad(x, 1, mode="symmetric")  # scipy's "reflect": the edge sample repeated
    if axis == 1:
        d = p[:, 2:] - p[:, :-2]
        s = d[:-2].astype(np.float64) + 2.0 * d[1:-1] + d[2:]
    else:
        d = p[2:, :] - p[:-2, :]
        s = d[:, :-2].astype(np.float64) + 2.0 * d[:, 1:-1] + d[:, 2:]
    return s.astype(np.float32)


def canny(image: np.ndarray, sigma: float, low_threshold: float, high_threshold: float) -> np.ndarray:
    """``skimage.feature.canny(image, sigma, low_threshold, high_threshold)`` of a float32 image in [0, 1]:
    the same edges, with the same Gaussian, Sobel and non-maximum suppression steps, ~2x faster: the
    normalisation of its zero-padded Gaussian (a Gaussian of ones) is computed once per image shape, the
    Sobel derivatives by :func:`_sobel`, and the hysteresis labels the 8-connected weak edges with OpenCV
    (:func:`~preprocessing.morphology.label`)."""
    img = np.asarray(image)
    if _nonmaximum_suppression_bilinear is None or img.dtype != np.float32 or img.ndim != 2 or min(img.shape) < 3:
        return _skfeature.canny(image, sigma=sigma, low_threshold=low_threshold, high_threshold=high_threshold)
    smoothed = ndi.gaussian_filter(img, sigma, mode="constant", cval=0.0, truncate=4.0)
    smoothed /= _canny_bleed_over(img.shape, float(sigma))
    jsobel = _sobel(smoothed, 1)
    isobel = _sobel(smoothed, 0)
    magnitude = isobel * isobel
    magnitude += jsobel * jsobel
    np.sqrt(magnitude, out=magnitude)
    inner = np.zeros(img.shape, dtype=bool)  # the border pixels are never edges
    inner[1:-1, 1:-1] = True
    low_masked = _nonmaximum_suppression_bilinear(isobel, jsobel, magnitude, inner, low_threshold)
    low_mask = low_masked > 0
    labels, count = label(low_mask, connectivity=8)
    if count == 0:
        return low_mask
    good = np.zeros(count + 1, dtype=bool)
    good[labels[low_mask & (low_masked >= high_threshold)]] = True
    good[0] = False
    return good[labels]


def local_range(g: np.ndarray, size: int = 5) -> np.ndarray:
    """``maximum_filter(g, size) - minimum_filter(g, size)`` (scipy's ``reflect`` mode: the outside ignored)."""
    return max_filter(g, size) - min_filter(g, size)


def _window_max(a: np.ndarray, sy: int, sx: int) -> np.ndarray:
    """``maximum_filter(a, size=(sy, sx), mode="constant")`` (cval 0)."""
    return max_filter(a, (sy, sx), cval=0)


def polygon_mask(shape: Sequence[int], polygon: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixel centres inside the convex ``polygon`` ((N, 2) ``(x, y)``, any orientation)."""
    h, w = int(shape[0]), int(shape[1])
    poly = np.asarray(polygon, dtype=np.float64)
    x0, x1 = max(math.floor(poly[:, 0].min()), 0), min(math.ceil(poly[:, 0].max()) + 1, w)
    y0, y1 = max(math.floor(poly[:, 1].min()), 0), min(math.ceil(poly[:, 1].max()) + 1, h)
    mask = np.zeros((h, w), dtype=bool)
    if x0 >= x1 or y0 >= y1:
        return mask
    xx = np.arange(x0, x1, dtype=np.float64)[None, :]
    yy = np.arange(y0, y1, dtype=np.float64)[:, None]
    area2 = float(np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1]))
    orient = 1.0 if area2 >= 0 else -1.0
    inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
    for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        inside &= orient * ((bx - ax) * (yy - ay) - (by - ay) * (xx - ax)) >= -1e-9
    mask[y0:y1, x0:x1] = inside
    return mask


def _clip_polygon(poly: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon ``(N, 2) (x, y)`` to ``[0, w] x [0, h]``."""
    pts = [tuple(p) for p in np.asarray(poly, dtype=np.float64)]
    for axis, bound, keep_less in ((0, 0.0, False), (0, w, True), (1, 0.0, False), (1, h, True)):
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cin = cur[axis] <= bound if keep_less else cur[axis] >= bound
            pin = prev[axis] <= bound if keep_less else prev[axis] >= bound
            if cin != pin:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cin:
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


# ------------------------------------------------------------------------------------ results
@dataclass(eq=False)
class CarrierSide:
    """Evidence for one accepted carrier side (input pixels; intensities in [0, 1]).

    Attributes:
        slot: ``"left"``, ``"right"``, ``"top"`` or ``"bottom"``.
        normal: (2,) unit normal ``(x, y)`` pointing to the exterior.
        offset: line ``normal . (x, y) = offset`` in *input* pixel coordinates.
        angle: tilt of the side from the image axis (degrees).
        contrast: median exterior minus interior intensity across the border (signed).
        coverage: fraction of the visible side showing the straight step edge.
        homogeneity: fraction of the exterior half-plane within tolerance of its median.
        exterior_level: median exterior intensity.
        length: visible length as a fraction of the image side it runs along.
        ends: (2, 2) end points ``(x, y)`` of the evidenced border segment.
        straightness: robust spread (1.4826 x median absolute distance, working px) of the step
            about the fitted line.
        sharpness: steepest 1-px rise of the step over its height (~0.35 for a sharp edge).
    """

    slot: str
    normal: np.ndarray
    offset: float
    angle: float
    contrast: float
    coverage: float
    homogeneity: float
    exterior_level: float
    length: float
    ends: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)), repr=False)
    straightness: float = 0.0
    sharpness: float = 0.0

    @property
    def score(self) -> float:
        """Evidence strength: coverage x |contrast| x visible length."""
        return float(self.coverage * abs(self.contrast) * self.length)


@dataclass
class CarrierResult:
    """Outcome of :func:`detect_carrier` (all coordinates in input pixels, ``(x, y)`` = (column, row)).

    Attributes:
        found: a carrier with at least one evidenced side.
        polygon: (4, 2) float corners ``(x, y)`` of the carrier rectangle (sides not seen are placed
            just outside the image, so corners may lie outside it); ``None`` when not found.
        box: ``(y0, y1, x0, x1)`` half-open crop box of the polygon clipped to the image (the whole
            image when not found).
        shape: ``(H, W)`` of the input.
        score: summed evidence of the accepted sides (0 when not found).
        sides: the accepted :class:`CarrierSide` s.
        reason: one line saying why a carrier was (not) reported.
    """

    found: bool
    polygon: np.ndarray | None
    box: tuple[int, int, int, int]
    shape: tuple[int, int]
    score: float = 0.0
    sides: list[CarrierSide] = field(default_factory=list)
    reason: str = ""

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the carrier polygon clipped to the image (all True when not found)."""
        if not self.found or self.polygon is None:
            return np.ones(self.shape, dtype=bool)
        return polygon_mask(self.shape, self.polygon)

    @property
    def crop_fraction(self) -> float:
        """Area of the crop box over the image area."""
        y0, y1, x0, x1 = self.box
        return (y1 - y0) * (x1 - x0) / float(self.shape[0] * self.shape[1])


# ------------------------------------------------------------------------------------ detection
@dataclass
class _Params:
    work_size: int
    max_rotation: float
    min_contrast: float
    min_coverage: float
    min_homogeneity: float
    min_length: float
    min_area: float
    edge_tolerance: float
    max_residual: float
    angle_tolerance: float
    num_peaks: int


def _line_samples(normals: np.ndarray, offsets: np.ndarray, h: int, w: int, margin: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample points every 1 px along the lines ``n . p = c`` inside the frame, all lines at once.

    Args:
        normals: (L, 2) float64 unit normals ``(x, y)``.
        offsets: (L,) float64 line offsets ``c``.
        h, w: frame size; points keep ``margin`` px from its border.

    Returns:
        ``(counts (L,), points (sum(counts), 2) (x, y), directions (L, 2))``: line ``l`` owns the next
        ``counts[l]`` points (0 where less than 4 px of it lie inside); its points are ``p0 + t d`` with
        ``p0 = c n``, ``d = (-n_y, n_x)`` and ``t = np.arange(lo, hi + 1e-9, 1.0)`` over the visible
        stretch (per line, so the values are those of a per-line computation, bit for bit).
    """
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 2)
    c = np.asarray(offsets, dtype=np.float64).reshape(-1)
    d = np.stack([-n[:, 1], n[:, 0]], axis=1)
    p0 = n * c[:, None]
    lo, hi = np.full(c.size, -1e9), np.full(c.size, 1e9)
    inside = np.ones(c.size, dtype=bool)
    for k, size in ((0, w), (1, h)):
        along = np.abs(d[:, k]) >= 1e-9  # the line crosses this axis' frame borders
        inside &= along | ((margin <= p0[:, k]) & (p0[:, k] <= size - 1 - margin))
        dk = np.where(along, d[:, k], 1.0)
        a, b = (margin - p0[:, k]) / dk, (size - 1 - margin - p0[:, k]) / dk
        lo = np.where(along, np.maximum(lo, np.minimum(a, b)), lo)
        hi = np.where(along, np.minimum(hi, np.maximum(a, b)), hi)
    inside &= hi - lo >= 4
    ts = [np.arange(lo[i], hi[i] + 1e-9, 1.0) if inside[i] else np.zeros(0) for i in range(c.size)]
    counts = np.array([t.size for t in ts], dtype=np.intp)
    line = np.repeat(np.arange(c.size), counts)
    t = np.concatenate(ts) if ts else np.zeros(0)
    return counts, p0[line] + t[:, None] * d[line], d


def _detrend(x: np.ndarray, y: np.ndarray, v: np.ndarray, usable: np.ndarray,
             max_samples: int = 3000) -> tuple[np.ndarray, float, float]:
    """Residuals of ``v`` around a robust plane ``a + b x + c y`` fitted on ``usable`` points.

    Returns:
        residuals (all points), the plane's range over the points, and the residuals' robust sigma
        over the usable points.
    """
    idx = np.flatnonzero(usable)
    idx = idx[:: max(1, idx.size // max_samples)]
    a = np.stack([np.ones(idx.size, dtype=np.float32), x[idx], y[idx]], axis=1)
    keep = np.ones(idx.size, dtype=bool)
    coef = np.zeros(3)
    for _ in range(2):
        coef = least_squares(a[keep], v[idx][keep])
        r = v[idx] - a @ coef
        sigma = max(_robust_sigma(r), 0.004)
        keep = np.abs(r) <= 3.0 * sigma
        if keep.sum() < 10:
            break
    plane = coef[0] + coef[1] * x + coef[2] * y
    return v - plane, float(plane.max() - plane.min()), _robust_sigma(r[keep]) if keep.any() else 0.0


def least_squares(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.linalg.lstsq(a, v)[0]`` for a tall ``a (n, k)`` of full rank (a plane through points spread over
    an area: ``k`` = 3), by the normal equations in float64 (~2x faster than lstsq's SVD on 3,000 points; equal
    to ~1e-15 relative, the result in the inputs' float type as lstsq gives it); lstsq itself when ``a^T a`` is
    singular (collinear points)."""
    a64 = np.asarray(a, dtype=np.float64)
    try:
        coef = np.linalg.solve(a64.T @ a64, a64.T @ np.asarray(v, dtype=np.float64))
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, v, rcond=None)[0]
    return coef.astype(np.result_type(a, v, np.float32), copy=False)


def _fit_line(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b t`` (closed form; ``np.polyfit`` costs ~10x more)."""
    tm, ym = float(t.mean()), float(y.mean())
    dt = t - tm
    var = float(dt @ dt)
    b = float(dt @ (y - ym)) / var if var > 0 else 0.0
    return ym - b * tm, b


def robust_line(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope of ``y = a + b t`` by least squares with outliers (> 0.75 px) dropped."""
    keep = np.ones(t.size, dtype=bool)
    a, b = _fit_line(t, y)
    for _ in range(3):
        r = np.abs(y - (a + b * t))
        new = r <= max(0.75, 2.5 * 1.4826 * float(_median(r)))
        if new.sum() < 8 or (new == keep).all():
            break
        keep = new
        a, b = _fit_line(t[keep], y[keep])
    return float(a), float(b)


def _median(v: np.ndarray) -> float:
    """Median (upper middle element for even sizes) without ``np.median``'s overhead on small arrays."""
    a = np.asarray(v).ravel()
    if a.size == 0:
        return float("nan")
    k = a.size // 2
    return float(np.partition(a, k)[k])


def exact_median(v: np.ndarray) -> float:
    """``np.median(v)`` (the mean of the two middle elements for even sizes) of a NaN-free array: the same
    value, without the extra selection of the maximum that ``np.median`` makes to detect NaN (a third of
    its time on the ~20,000 background residuals of a working copy)."""
    a = np.asarray(v).ravel()
    n = a.size
    if n == 0:
        return float("nan")
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k])
    return float(np.mean(np.partition(a, (k - 1, k))[k - 1: k + 1]))


def count_true(b: np.ndarray, axis: int) -> np.ndarray:
    """``b.sum(axis)`` of a bool array as ``intp`` counts, 2-3x faster: the bytes summed in 16 bits (exact
    while the axis is shorter than 65536; numpy's bool sum converts each element to int64 first)."""
    if b.shape[axis] >= 65536:
        return b.sum(axis=axis)
    return b.view(np.uint8).sum(axis=axis, dtype=np.uint16).astype(np.intp)


def _robust_sigma(v: np.ndarray) -> float:
    return float(1.4826 * _median(np.abs(v - _median(v)))) if v.size else 0.0


def masked_median(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``x (L, T)`` the median (upper middle element, as :func:`_median`) of the ``mask``
    entries; NaN for a row without any."""
    srt = np.sort(np.where(mask, x, np.inf), axis=1)
    count = mask.sum(axis=1)
    out = np.take_along_axis(srt, np.minimum(count // 2, x.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(count > 0, out, np.nan)


def line_fit_rows(t: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``(L, T)`` arrays the least-squares ``(a, b)`` of ``y = a + b t`` through the ``m`` points
    (``t`` may broadcast, e.g. ``(1, T)``): two ``(L,)`` arrays; ``b = 0`` (``a`` the mean) for a row whose
    points share one ``t``, ``a = b = 0`` for a row without any."""
    w = m.astype(np.float64)
    n = np.maximum(w.sum(axis=1), 1.0)
    tm = (w * np.where(m, t, 0.0)).sum(axis=1) / n
    ym = (w * np.where(m, y, 0.0)).sum(axis=1) / n
    dt = np.where(m, t - tm[:, None], 0.0)
    var = (dt * dt).sum(axis=1)
    b = np.where(var > 0, (dt * np.where(m, y - ym[:, None], 0.0)).sum(axis=1) / np.where(var > 0, var, 1.0), 0.0)
    return ym - b * tm, b


def _robust_line_batch(t: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`robust_line` for every row of ``(L, T)`` arrays at once (rows of ``mask`` are the points)."""
    keep = mask.copy()
    a, b = line_fit_rows(t, y, keep)
    active = np.ones(t.shape[0], dtype=bool)
    for _ in range(3):
        r = np.abs(y - (a[:, None] + b[:, None] * t))
        limit = np.maximum(0.75, 2.5 * 1.4826 * masked_median(r, keep))
        new = mask & (r <= limit[:, None])
        stop = (new.sum(axis=1) < 8) | (new == keep).all(axis=1)
        active &= ~stop
        if not active.any():
            break
        keep = np.where(active[:, None], new, keep)
        a2, b2 = line_fit_rows(t, y, keep)
        a, b = np.where(active, a2, a), np.where(active, b2, b)
    return a, b


def _last_mean(a: np.ndarray) -> np.ndarray:
    """``a.mean(axis=-1)``, bit for bit, ~4x faster for the few (< 8) samples of a profile band.

    numpy reduces a short last axis element by element (slow per row); summing its slices left to right
    is the very order numpy uses below 8 terms (pairwise summation starts at 8), so the sums, and the
    division by the count, are identical. Longer axes fall back to ``mean``.
    """
    n = a.shape[-1]
    if not 0 < n < 8:
        return a.mean(axis=-1)
    total = a[..., 0].copy()
    for j in range(1, n):
        total += a[..., j]
    return total / n


def _last_max(a: np.ndarray) -> np.ndarray:
    """``a.max(axis=-1)`` by a running ``np.maximum`` over the last axis' slices (exact: max does not
    round; ~5x faster than numpy's reduction over a short last axis). ``a`` must hold no NaN."""
    out = a[..., 0].copy()
    for j in range(1, a.shape[-1]):
        np.maximum(out, a[..., j], out=out)
    return out


def _edge_positions_batch(prof: np.ndarray, inner: np.ndarray, outer: np.ndarray, sign: np.ndarray,
                          offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel step position of each row of ``(L, T, K)`` profiles and its steepest 1-px rise.

    The position is where the profile crosses half-way between its inner and outer levels, by linear
    interpolation, taking the crossing nearest the line (no pixel locking, unlike a peak fit); ``+`` is
    towards the exterior. Rows without a crossing (and NaN padding rows) get 99."""
    level = 0.5 * (inner + outer)
    z = sign[:, None, None] * (prof - level[:, :, None])
    pos = nearest_rise(z, offsets)
    rise = sign[:, None, None] * np.diff(prof, axis=2)
    step = _last_max(np.where(np.isnan(rise), -np.inf, rise))
    return np.where(np.isfinite(pos), pos, 99.0), step


def _border_stats(meas: Sequence[tuple], min_contrast: float, edge_tolerance: float) -> dict[str, np.ndarray]:
    """The step-border statistics of refined lines, all at once (each row as :meth:`_Detector._judge` once took
    them line by line, the same values): per line ``m_out`` (median exterior band level), the samples ``ok``
    where the step is there (contrast >= half the line's and >= ``min_contrast``; exterior band within ``tol``
    of ``m_out``, ``tol = max(0.03, 3 sigma, contrast / 4)``; position within ``edge_tolerance``), their
    ``count``, ``first`` and ``last``, the ``coverage`` of the stretch between them (samples whose exterior
    band is disturbed, a marker on the border, not counted when <= 15 % of it), ``straightness`` (robust
    spread of the step positions), ``jitter`` (its noise part: differences 3 samples apart / sqrt 2) and
    ``sharpness`` (steepest 1-px rise / contrast, median). Medians are the upper middle element
    (:func:`_median`, :func:`masked_median`).

    Args:
        meas: per line the measurement of :meth:`_Detector._refine_batch` (``pts, d, inner, outer, diff,
            contrast, sign, pos, step``; the arrays over the line's valid samples).
    """
    n_l = len(meas)
    t_max = max(1, max(len(m[3]) for m in meas))
    outer, diff, pos, step = (np.zeros((n_l, t_max)) for _ in range(4))
    valid = np.zeros((n_l, t_max), dtype=bool)
    contrast = np.array([m[5] for m in meas], dtype=np.float64)
    sign = np.array([m[6] for m in meas], dtype=np.float64)
    for j, m in enumerate(meas):
        k = len(m[3])
        outer[j, :k], diff[j, :k], pos[j, :k], step[j, :k], valid[j, :k] = m[3], m[4], m[7], m[8], True
    m_out = masked_median(outer, valid)
    dev = np.abs(outer - m_out[:, None])
    sigma = 1.4826 * masked_median(dev, valid)
    tol = np.maximum(np.maximum(0.03, 3.0 * np.maximum(sigma, 0.004)), 0.25 * np.abs(contrast))
    least = np.maximum(min_contrast, 0.5 * np.abs(contrast))
    ok = valid & (sign[:, None] * diff >= least[:, None]) & (dev <= tol[:, None]) \
        & (np.abs(pos) <= edge_tolerance)
    count = ok.sum(axis=1)
    first = np.argmax(ok, axis=1)
    last = t_max - 1 - np.argmax(ok[:, ::-1], axis=1)
    cols = np.arange(t_max)[None, :]
    span = (cols >= first[:, None]) & (cols <= last[:, None])
    disturbed = (span & (dev > tol[:, None])).sum(axis=1)
    width = last - first + 1
    n_disturbed = np.where(disturbed / np.maximum(width, 1) <= 0.15, disturbed, 0)  # markers are short
    coverage = count / np.maximum(width - n_disturbed, 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        straightness = 1.4826 * masked_median(np.abs(pos), ok)
        sharpness = masked_median(step / np.abs(diff), ok)
    order = np.argsort(~ok, axis=1, kind="stable")  # each line's ok samples first, in order
    pk = np.take_along_axis(pos, order, axis=1)
    d3 = np.abs(pk[:, 3:] - pk[:, :-3]) if t_max > 3 else np.zeros((n_l, 0))
    n3 = np.arange(d3.shape[1])[None, :] < (count - 3)[:, None]
    jitter = np.where(count > 6, 1.4826 * masked_median(d3, n3) / math.sqrt(2.0) if d3.size else 0.0, 0.0)
    return {"m_out": m_out, "count": count, "first": first, "last": last, "coverage": coverage,
            "straightness": straightness, "jitter": jitter, "sharpness": sharpness}


class _Detector:
    """One detection run on a working copy ``g (h, w)`` (smoothed, [0, 1])."""

    def __init__(self, g: np.ndarray, p: _Params) -> None:
        self.g = g
        self.p = p
        self.h, self.w = g.shape
        self.half = max(4, round(6 * max(self.h, self.w) / 256))  # across-profile half length (px)
        self.offsets = np.arange(-self.half, self.half + 1, dtype=np.float64)
        self.log: list[tuple[float, float, str]] = []  # (angle of n, offset, why rejected) for debugging
        self.borders: list[CarrierSide] = []  # lines with a straight step border (exterior not checked)
        self._cache: dict[tuple[float, float, float], Any] = {}

    # pixel grids and the bone map are needed only by the few lines that reach the exterior tests
    @functools.cached_property
    def xx(self) -> np.ndarray:
        return np.broadcast_to(np.arange(self.w, dtype=np.float32)[None, :], (self.h, self.w))

    @functools.cached_property
    def yy(self) -> np.ndarray:
        return np.broadcast_to(np.arange(self.h, dtype=np.float32)[:, None], (self.h, self.w))

    @functools.cached_property
    def bony(self) -> np.ndarray:
        """Bone-like pixels: bright (above Yen's threshold) and textured; flat bright (unexposed
        collimator bands, label boxes) is not bone."""
        return (self.g >= float(threshold_yen(self.g))) & (local_range(self.g, 5) >= 0.05)

    def _reject(self, n: np.ndarray, c: float, why: str) -> None:
        self.log.append((math.degrees(math.atan2(n[1], n[0])), c, why))

    def _objects(self, mask: np.ndarray, border: np.ndarray) -> tuple[int, int, int]:
        """Split ``mask`` into burned-in markers and the rest: (marker px, other px, other px touching ``border``).

        A marker is a compact component (<= 2.5 % of the image, extent <= 30 % of the long side), such
        as an L/R letter or a text box; it may straddle a border.
        """
        if not mask.any():
            return 0, 0, 0
        lab, nlab = label(mask)
        sizes = np.bincount(lab.ravel(), minlength=nlab + 1)
        sizes[0] = 0
        marker = sizes <= 0.025 * self.g.size
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if marker[i] and sl is not None:
                marker[i] = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= 0.3 * max(self.h, self.w)
        marker[0] = False
        touching = np.zeros(nlab + 1, dtype=bool)
        touching[lab[border & mask]] = True
        touching[0] = False
        other = ~marker
        other[0] = False
        return int(sizes[marker].sum()), int(sizes[other].sum()), int(sizes[other & touching].sum())

    # -- across-line profiles ------------------------------------------------------------------
    def _profiles(self, n: np.ndarray, c: float):
        """Points (T, 2), direction and across-line profiles (T, K) of ``n . p = c`` (cached per line)."""
        key = (round(float(n[0]), 9), round(float(n[1]), 9), round(float(c), 6))
        flipped = (-key[0], -key[1], -key[2])
        if key in self._cache:
            return self._cache[key]
        if flipped in self._cache:  # same line, other exterior side: reverse both axes
            fp = self._cache[flipped]
            if fp is None:
                return None
            pts, d, prof = fp
            return pts[::-1], -d, prof[::-1, ::-1]
        self._sample([(n, c)])
        return self._cache.get(key)

    def _sample(self, lines: Sequence[tuple[np.ndarray, float]]) -> None:
        """Across-line profiles of ``lines`` into the cache: the points of all lines (one vectorised
        step), K offsets across each, one interpolation call for all."""
        if not lines:
            return
        normals = np.array([n for n, _ in lines], dtype=np.float64).reshape(len(lines), 2)
        counts, pts, dirs = _line_samples(normals, np.array([c for _, c in lines], dtype=np.float64),
                                          self.h, self.w)
        values = profiles(self.g, pts, normals, counts, self.offsets)  # (P, K) across each point's line
        start = 0
        for (n, c), count, d in zip(lines, counts, dirs, strict=True):
            res = None
            if count:
                res = (pts[start: start + count], d.copy(), values[start: start + count])
                start += count
            if len(self._cache) < 4096:
                self._cache[self._cache_key(n, c)] = res

    def evaluate(self, n: np.ndarray, c: float) -> CarrierSide | None:
        """Test the line ``n . p = c`` as a carrier side with its exterior on the ``+n`` side."""
        refined = self._refine_batch([(np.asarray(n, dtype=np.float64), float(c))])[0]
        return None if refined is None else self._judge(*refined)

    def _refine_batch(self, lines: Sequence[tuple[np.ndarray, float]]) -> list[tuple | None]:
        """Refine lines on their sub-pixel step positions (2x) and take their final measurements, all
        lines at once (one interpolation call and array operations per round, no per-line loop).

        Per round and line: the across-line profiles, inner/outer band means, the contrast (median of
        the differences >= ``min_contrast``), the step positions; a line is dropped (logged) without
        contrast, without a step edge on enough of it, with a non-uniform exterior band (first round)
        or when the step is clearly curved; else it is moved to the robust line through its step
        positions (fitted on the typical stretch, where neither band is disturbed by a label or a limb).

        Returns:
            Per line ``None`` (rejected) or ``(n, c, measurement)`` for :meth:`_judge`.
        """
        p = self.p
        n_l = len(lines)
        normals = np.array([ln[0] for ln in lines], dtype=np.float64).reshape(n_l, 2)
        offsets = np.array([ln[1] for ln in lines], dtype=np.float64)
        live = np.ones(n_l, dtype=bool)
        done = np.zeros(n_l, dtype=bool)  # converged: keep this round's measurement
        final: list[tuple | None] = [None] * n_l
        k = self.half
        for it in range(3):
            idx = np.flatnonzero(live & ~done)
            if idx.size == 0:
                break
            meas = self._measure_batch([(normals[i], offsets[i]) for i in idx])
            pts_l, d_l, prof, valid = meas
            n_t = valid.shape[1]
            inner = _last_mean(prof[:, :, : k - 1])  # NaN on padding rows (never valid)
            outer = _last_mean(prof[:, :, k + 2:])
            diff = outer - inner
            big = valid & (np.abs(diff) >= p.min_contrast)
            n_big = big.sum(axis=1)
            contrast = masked_median(diff, big)
            sign = np.where(contrast > 0, 1.0, -1.0)
            pos, step = _edge_positions_batch(prof, inner, outer, sign, self.offsets)
            good = valid & (sign[:, None] * diff > 0.5 * np.abs(contrast)[:, None]) & (np.abs(pos) <= 2.5)
            along = np.array([self.w if abs(normals[i][1]) > abs(normals[i][0]) else self.h for i in idx])
            n_good = good.sum(axis=1)
            reject = np.full(idx.size, "", dtype=object)
            reject[n_big < 8] = "no contrast"
            reject[(reject == "") & (n_good < np.maximum(8, 0.6 * p.min_length * along))] = "no step edge"
            if it == 0:  # cheap screen: the exterior band must be uniform along enough of the line
                med_out = masked_median(outer, good)
                uniform = good & (np.abs(outer - med_out[:, None])
                                  <= np.maximum(0.03, 0.25 * np.abs(contrast))[:, None])
                reject[(reject == "") & (uniform.sum(axis=1) < 0.6 * p.min_length * along)] = "exterior band not uniform"
            keep_meas = reject == ""
            if it < 2:
                band_tol = np.maximum(0.03, 0.25 * np.abs(contrast))[:, None]
                typical = good & (np.abs(inner - masked_median(inner, good)[:, None]) <= band_tol) \
                    & (np.abs(outer - masked_median(outer, good)[:, None]) <= band_tol)
                fit = np.where((typical.sum(axis=1) >= 8)[:, None], typical, good)
                t = np.einsum("ltj,lj->lt", pts_l - pts_l[:, :1], d_l)
                a, b = _robust_line_batch(t, pos, fit)
                spread = 1.4826 * masked_median(np.abs(pos - a[:, None] - b[:, None] * t), fit)
                curved = keep_meas & (spread > 2.0 * p.max_residual)
                for j in np.flatnonzero(curved):
                    reject[j] = f"not a straight border (spread {spread[j]:.2f} px)"
                converged = (np.abs(a) < 0.05) & (np.abs(b) < 1e-3)
            else:
                converged = np.ones(idx.size, dtype=bool)
            for j, i in enumerate(idx):
                if reject[j]:
                    self._reject(normals[i], offsets[i], str(reject[j]))
                    live[i] = False
                    continue
                if converged[j]:
                    row = valid[j]
                    m = (pts_l[j][row], d_l[j], inner[j][row], outer[j][row], diff[j][row], float(contrast[j]),
                         float(sign[j]), pos[j][row], step[j][row])
                    final[i] = (normals[i].copy(), float(offsets[i]), m)
                    done[i] = True
                    continue
                nn, dd = normals[i], d_l[j]
                anchor = pts_l[j][0] + nn * a[j]  # refined point at t = 0
                nn = (nn - b[j] * dd) / math.hypot(1.0, b[j])  # normal of the refined line pts + n (a + b t)
                normals[i], offsets[i] = nn, float(anchor @ nn)
            del n_t
        return final

    def _measure_batch(self, lines: Sequence[tuple[np.ndarray, float]]):
        """Across-line profiles of ``lines`` padded to one length: points (L, T, 2), directions (L, 2),
        profiles (L, T, K) (NaN where a line is shorter) and the valid mask (L, T)."""
        self._sample([ln for ln in lines if self._cache_key(*ln) not in self._cache])
        res = [self._profiles(n, c) for n, c in lines]
        t_max = max((r[0].shape[0] for r in res if r is not None), default=1)
        n_l, kk = len(lines), self.offsets.size
        pts = np.zeros((n_l, t_max, 2))
        dirs = np.zeros((n_l, 2))
        prof = np.full((n_l, t_max, kk), np.nan, dtype=np.float64)
        valid = np.zeros((n_l, t_max), dtype=bool)
        for j, r in enumerate(res):
            if r is None:
                continue
            pp, d, pr = r
            pts[j, : pp.shape[0]], dirs[j], prof[j, : pp.shape[0]], valid[j, : pp.shape[0]] = pp, d, pr, True
        return pts, dirs, prof, valid

    def _cache_key(self, n: np.ndarray, c: float) -> tuple[float, float, float]:
        return round(float(n[0]), 9), round(float(n[1]), 9), round(float(c), 6)

    def _judge(self, n: np.ndarray, c: float, m: tuple) -> CarrierSide | None:
        """Judge a refined line (see :meth:`evaluate`) from its final measurement ``m``."""
        return self._judge_batch([(n, c, m)])[0]

    def _judge_batch(self, refined: Sequence[tuple[np.ndarray, float, tuple]]) -> list[CarrierSide | None]:
        """:meth:`_judge` of several refined lines: the border statistics of all of them at once
        (:func:`_border_stats`: most lines end there), then the exterior tests line by line."""
        if not refined:
            return []
        p = self.p
        stats = _border_stats([m for _, _, m in refined], p.min_contrast, p.edge_tolerance)
        out: list[CarrierSide | None] = []
        for j, (n, c, m) in enumerate(refined):
            b = {key: float(value[j]) for key, value in stats.items()}  # this line's border
            b["length"] = b["count"] / float(self.w if abs(n[1]) > abs(n[0]) else self.h)
            if b["length"] < p.min_length:
                self._reject(n, c, f"edge length {b['length']:.2f}")
                out.append(None)
                continue
            b["spread_limit"] = max(p.max_residual, 2.0 * b["jitter"])
            if b["straightness"] > 2.0 * b["spread_limit"] or b["coverage"] < 0.6:
                self._reject(n, c, f"not a straight border (spread {b['straightness']:.2f} px, "
                                   f"coverage {b['coverage']:.2f})")
                out.append(None)
                continue
            out.append(self._judge_exterior(n, c, m, b))
        return out

    def _judge_exterior(self, n: np.ndarray, c: float, m: tuple, b: dict[str, float]) -> CarrierSide | None:
        """The rest of :meth:`_judge` for a line with a straight step border ``b`` (its row of
        :func:`_border_stats` with ``length`` and ``spread_limit``): the side's slot and ends (a border,
        whatever its exterior), its straightness limit, then the exterior half-plane."""
        p = self.p
        m_out, length, coverage = b["m_out"], b["length"], b["coverage"]
        straightness, jitter, sharpness = b["straightness"], b["jitter"], b["sharpness"]
        i0, i1 = int(b["first"]), int(b["last"]) + 1
        pts, d, inner, outer, diff, contrast, sign, pos, step = m
        if abs(n[0]) >= abs(n[1]):
            slot = "right" if n[0] > 0 else "left"
        else:
            slot = "bottom" if n[1] > 0 else "top"
        angle = (math.degrees(math.atan2(n[1], n[0])) + 45.0) % 90.0 - 45.0  # rectangle rotation
        ends = np.stack([pts[i0], pts[i1 - 1]])
        self.borders.append(CarrierSide(slot=slot, normal=n.copy(), offset=c, angle=angle, contrast=contrast,
                                        coverage=coverage, homogeneity=0.0, exterior_level=m_out,
                                        length=length, ends=ends, straightness=straightness,
                                        sharpness=sharpness))  # good enough to mark a corner
        if straightness > b["spread_limit"] or coverage < p.min_coverage:  # skin, bone outlines curve smoothly
            self._reject(n, c, f"not straight enough (spread {straightness:.2f} px, jitter {jitter:.2f}, "
                               f"coverage {coverage:.2f})")
            return None
        # ---- exterior half-plane: homogeneous around a gentle trend, contrasted, nothing crossing.
        # Outliers are burned-in markers (compact, apart from the border: tolerated when small),
        # structure touching the border (anatomy continuing past it: refused) or clutter.
        proj = self.xx * np.float32(n[0]) + self.yy * np.float32(n[1]) - np.float32(c)
        ext = proj > 2.5
        n_ext = int(ext.sum())
        across = self.h if abs(n[1]) > abs(n[0]) else self.w
        if n_ext < max(20, 0.003 * self.g.size) or float(proj.max()) < max(5.0, 0.02 * across):
            self._reject(n, c, "no exterior (or a sliver not worth cutting)")
            return None
        v = self.g[ext]
        usable = np.abs(v - m_out) <= 0.5 * abs(contrast)  # exterior background (not markers on it)
        if usable.sum() < 20:
            self._reject(n, c, "exterior unlike the band outside the border")
            return None
        resid, trend, sigma = _detrend(self.xx[ext], self.yy[ext], v, usable)
        tol_ext = max(0.03, 4.0 * max(sigma, 0.004))
        if abs(contrast) < 2.0 * tol_ext or trend > 0.5 * abs(contrast):
            self._reject(n, c, f"contrast {contrast:.3f} tol {tol_ext:.3f} trend {trend:.3f}")
            return None
        outlier = np.zeros_like(ext)
        outlier[ext] = np.abs(resid) > tol_ext
        # the border's own penumbra (collimator edges are soft) varies across, not along, the border:
        # compare the near band depth by depth
        margin = max(5.0, 2.0 * self.half)
        near = ext & (proj <= margin)
        depth = np.floor(proj[near] - 2.5).astype(np.intp)
        r_map = np.zeros_like(self.g)
        r_map[ext] = resid
        r_near = r_map[near]
        level = np.array([_median(r_near[depth == k]) if np.any(depth == k) else 0.0
                          for k in range(int(depth.max()) + 1)]) if depth.size else np.zeros(1)
        outlier[near] = np.abs(r_near - level[depth]) > tol_ext
        band = ext & (proj <= margin + self.half)
        marker_px, other_px, crossing = self._objects(outlier, band)
        homogeneity = 1.0 - other_px / n_ext
        if homogeneity < p.min_homogeneity or crossing > 0.003 * self.g.size:
            self._reject(n, c, f"homogeneity {homogeneity:.2f}, {crossing} px of structure crossing")
            return None
        depth = min(margin, 0.5 * float(proj.max()))  # a thin exterior (a band) is checked to 2.5 px of its border
        _, bone_px, _ = self._objects(self.bony & (proj > max(depth, 2.5)), band)
        if bone_px > 0.002 * self.g.size:  # bone-like texture beyond the border: anatomy, never crop it
            self._reject(n, c, f"{bone_px} px of bone-like structure outside")
            return None
        m_ext = float(_median(v))
        return CarrierSide(slot=slot, normal=n.copy(), offset=c, angle=angle, contrast=contrast,
                           coverage=coverage, homogeneity=homogeneity, exterior_level=m_ext, length=length,
                           ends=ends, straightness=straightness, sharpness=sharpness)

    # -- candidates -----------------------------------------------------------------------------
    def candidates(self) -> list[tuple[np.ndarray, float]]:
        p = self.p
        edges = canny(self.g, sigma=1.0, low_threshold=0.5 * p.min_contrast, high_threshold=p.min_contrast)
        if edges.sum() < 10:
            return []
        r = math.radians(p.max_rotation)
        step = math.radians(0.5)
        near0 = np.arange(-r, r + 1e-9, step)
        near90 = np.concatenate([np.arange(-math.pi / 2, -math.pi / 2 + r + 1e-9, step),
                                 np.arange(math.pi / 2 - r, math.pi / 2 - 1e-9, step)])
        theta = np.sort(np.concatenate([near0, near90]))
        acc, angles, dists = hough_line(edges, theta=theta)
        min_votes = max(8, int(0.5 * p.min_length * min(self.h, self.w)))
        # local maxima (7 distances x 9 angles) above min_votes, strongest first
        peak = (acc == _window_max(acc.astype(np.int32), 7, 9)) & (acc >= min_votes)
        i_d, i_t = np.nonzero(peak)
        order = np.argsort(-acc[i_d, i_t], kind="stable")[: p.num_peaks]
        return [(np.array([math.cos(angles[t]), math.sin(angles[t])]), float(dists[dd]))
                for dd, t in zip(i_d[order], i_t[order], strict=True)]

    def _screen(self, lines: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """(L, 2) bool: whether ``(n, c)`` (column 0) and ``(-n, -c)`` (column 1) pass the first checks.

        A batched replica of the first pass of :meth:`evaluate` (a contrast, a step edge on the line,
        a uniform exterior band along enough of it) on all lines at once; most Hough lines fail it,
        and only the others are evaluated one by one.
        """
        p, k = self.p, self.half
        self._sample(lines)
        profs = [self._cache.get((round(float(n[0]), 9), round(float(n[1]), 9), round(float(c), 6)))
                 for n, c in lines]
        ok = np.zeros((len(lines), 2), dtype=bool)
        live = [i for i, r in enumerate(profs) if r is not None]
        if not live:
            return ok
        t_max = max(profs[i][2].shape[0] for i in live)
        prof = np.full((len(live), t_max, self.offsets.size), np.nan, dtype=np.float32)
        for j, i in enumerate(live):
            prof[j, : profs[i][2].shape[0]] = profs[i][2]
        prof = np.concatenate([prof, prof[:, :, ::-1]])  # exterior on +n, then on -n (reversed offsets)
        with np.errstate(invalid="ignore"):
            inner = _last_mean(prof[:, :, : k - 1])
            outer = _last_mean(prof[:, :, k + 2:])
            diff = outer - inner  # NaN on padding rows: every comparison below is False there
            big = np.abs(diff) >= p.min_contrast
            n_big = big.sum(axis=1)
            rows = np.arange(prof.shape[0])
            contrast = np.sort(np.where(big, diff, np.inf), axis=1)[rows, np.minimum(n_big // 2, t_max - 1)]
            sign = np.where(contrast > 0, 1.0, -1.0).astype(np.float32)
            z = sign[:, None, None] * (prof - (0.5 * (inner + outer))[:, :, None])
            pos = nearest_rise(z, self.offsets)
            good = (sign[:, None] * diff > 0.5 * np.abs(contrast)[:, None]) & (np.abs(pos) <= 2.5)
            n_good = good.sum(axis=1)
            med = np.sort(np.where(good, outer, np.inf), axis=1)[rows, np.minimum(n_good // 2, t_max - 1)]
            tol = np.maximum(0.03, 0.25 * np.abs(contrast))
            n_uniform = (good & (np.abs(outer - med[:, None]) <= tol[:, None])).sum(axis=1)
        along = np.array([self.w if abs(lines[i][0][1]) > abs(lines[i][0][0]) else self.h for i in live] * 2)
        need = 0.6 * p.min_length * along
        passed = (n_big >= 8) & (n_good >= np.maximum(8, need)) & (n_uniform >= need)
        ok[live, 0] = passed[: len(live)]
        ok[live, 1] = passed[len(live):]
        return ok

    def run(self) -> list[CarrierSide]:
        sides: list[CarrierSide] = []
        lines = self.candidates()
        if not lines:
            return sides
        screen = self._screen(lines)
        todo = [(sg * n, sg * c) for (n, c), ok in zip(lines, screen, strict=True)
                for sg, keep in zip((1.0, -1.0), ok, strict=True) if keep]
        if not todo:
            return sides
        refined = [r for r in self._refine_batch(todo) if r is not None]
        sides.extend(side for side in self._judge_batch(refined) if side is not None)
        return sides


def _exit_distance(p: np.ndarray, u: np.ndarray, w: int, h: int) -> float:
    """Distance from ``p`` along direction ``u`` to the border of the frame ``[0, w-1] x [0, h-1]``."""
    norm = float(np.hypot(*u))
    if norm < 1e-9:
        return 0.0
    u = u / norm
    dist = math.inf
    for k, size in ((0, w), (1, h)):
        if u[k] > 1e-9:
            dist = min(dist, (size - 1 - p[k]) / u[k])
        elif u[k] < -1e-9:
            dist = min(dist, -p[k] / u[k])
    return max(dist, 0.0)


def _closed(sides: list[CarrierSide], borders: list[CarrierSide], shape: tuple[int, int],
            tol: float) -> list[CarrierSide]:
    """Drop sides whose border segment stops in mid-image instead of at the frame or a corner.

    A carrier side runs from corner to corner (or off the frame); where the border of something else
    (a straight limb, a bone, a label) happens to be straight, the evidence stops in the open. An end
    counts as a corner when it meets (or passes) a perpendicular accepted side, or a perpendicular
    straight step border (``borders``; its exterior need not pass the tests, e.g. a marker sits there).
    """
    h, w = shape
    kept = list(sides)
    changed = True
    while changed and kept:
        changed = False
        for s in list(kept):
            perp = [o for o in kept + borders
                    if o is not s and o.slot not in (s.slot, _OPPOSITE[s.slot]) and _same_angle(o, s, 1.5)]
            mid = s.ends.mean(axis=0)
            for end in s.ends:
                u = (end - mid) / max(float(np.hypot(*(end - mid))), 1e-9)  # outwards along the side
                at_frame = _exit_distance(end, u, w, h) <= tol
                at_side = any(float(o.normal @ u) > 0.9 and -tol <= float(o.normal @ end) - o.offset <= 3 * tol
                              and _near_segment(o, end, tol) for o in perp)  # met (or just passed) a corner
                if not (at_frame or at_side):
                    kept.remove(s)
                    changed = True
                    break
    return kept


def _same_angle(a: CarrierSide, b: CarrierSide, tol: float) -> bool:
    return abs(a.angle - b.angle) <= tol


def _near_segment(o: CarrierSide, p: np.ndarray, tol: float) -> bool:
    """Whether ``p`` projects onto the evidenced segment of ``o`` (extended by ``tol``)."""
    d = np.array([-o.normal[1], o.normal[0]])
    t0, t1 = sorted(float(e @ d) for e in o.ends)
    t = float(p @ d)
    return t0 - tol <= t <= t1 + tol


def _assemble(sides: list[CarrierSide], borders: list[CarrierSide], p: _Params, shape: tuple[int, int],
              tol: float) -> list[CarrierSide]:
    """One rotation (rectangle), the outermost closed side per slot, every side closed at both ends."""
    best: list[CarrierSide] = []
    for ref in sorted(sides, key=lambda s: -s.score):
        group = _closed([s for s in sides if abs(s.angle - ref.angle) <= p.angle_tolerance], borders, shape, tol)
        chosen: dict[str, CarrierSide] = {}
        for s in sorted(group, key=lambda s: -s.offset):  # outermost per slot: never cut inwards
            chosen.setdefault(s.slot, s)
        cand = _closed(list(chosen.values()), borders, shape, tol)
        if sum(s.score for s in cand) > sum(s.score for s in best):
            best = cand
    return best


def _to_input(s: CarrierSide, factor: float, offset: float) -> CarrierSide:
    """The side in input pixels (working pixel ``i`` lies at ``factor * i + offset``)."""
    n = s.normal
    return dataclasses.replace(s, offset=s.offset * factor + offset * float(n[0] + n[1]),
                               ends=s.ends * factor + offset)


def _rectangle(sides: list[CarrierSide], shape: tuple[int, int]):
    """(4, 2) polygon in input pixels from the accepted sides; missing sides just outside the image."""
    h, w = shape
    angle = math.radians(float(np.mean([s.angle for s in sides])))
    ca, sa = math.cos(angle), math.sin(angle)
    normals = {"right": np.array([ca, sa]), "left": np.array([-ca, -sa]),
               "bottom": np.array([-sa, ca]), "top": np.array([sa, -ca])}
    corners_img = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    lines = {}
    by_slot = {s.slot: s for s in sides}
    for slot in _SLOTS:
        if slot in by_slot:
            s = by_slot[slot]
            n = s.normal
            lines[slot] = (n, s.offset)
        else:
            n = normals[slot]
            lines[slot] = (n, float((corners_img @ n).max()) + 1.0)

    def meet(a: str, b: str) -> np.ndarray:
        (n1, c1), (n2, c2) = lines[a], lines[b]
        return np.linalg.solve(np.stack([n1, n2]), np.array([c1, c2]))

    return np.stack([meet("left", "top"), meet("top", "right"), meet("right", "bottom"), meet("bottom", "left")])


def detect_carrier(
    image: Any,
    work_size: int = 256,
    max_rotation: float = 20.0,
    min_contrast: float = 0.06,
    min_coverage: float = 0.85,
    min_homogeneity: float = 0.9,
    min_length: float = 0.3,
    min_area: float = 0.25,
    edge_tolerance: float = 1.5,
    max_residual: float = 0.4,
    angle_tolerance: float = 1.5,
    num_peaks: int = 24,
) -> CarrierResult:
    """Find the X-ray carrier of a radiograph, demanding evidence for each of its sides.

    Args:
        image: (H, W) (or (1, H, W)) float image in [0, 1], bone bright.
        work_size: long side of the working copy the search runs on.
        max_rotation: largest carrier rotation searched (degrees from the image axes).
        min_contrast: smallest |exterior - interior| intensity step of a side.
        min_coverage: fraction of a side's evidenced segment that must show the straight step.
        min_homogeneity: fraction of the exterior half-plane within tolerance of its median.
        min_length: shortest visible side, as a fraction of the image side it runs along.
        min_area: smallest carrier area, as a fraction of the image.
        edge_tolerance: largest distance (working px) of the step from the fitted straight line.
        max_residual: largest robust spread (working px) of the step about that line (straightness).
        angle_tolerance: largest tilt difference (degrees) between sides of one carrier.
        num_peaks: Hough lines examined.

    Returns:
        :class:`CarrierResult` (``found=False``, whole-image box when there is no convincing carrier).

    Raises:
        ValueError: ``image`` is not 2-D (or ``(1, H, W)``).
    """
    arr = plane_2d(image, "detect_carrier")
    shape = (int(arr.shape[0]), int(arr.shape[1]))
    whole = (0, shape[0], 0, shape[1])
    p = _Params(work_size, max_rotation, min_contrast, min_coverage, min_homogeneity, min_length, min_area,
                edge_tolerance, max_residual, angle_tolerance, num_peaks)
    if min(shape) < 16:
        return CarrierResult(False, None, whole, shape, reason="image too small")
    small, factor, offset = work_copy(finite(arr), work_size)
    g = gaussian(small, 1.0)
    if float(g.max() - g.min()) < 2 * min_contrast:
        return CarrierResult(False, None, whole, shape, reason="no contrast")
    det = _Detector(g, p)
    sides = _assemble(det.run(), det.borders, p, g.shape, tol=max(8.0, 3.0 * det.half))
    if not sides:
        return CarrierResult(False, None, whole, shape, reason="no side with straight border and uniform exterior")
    sides = [_to_input(s, factor, offset) for s in sides]
    poly = _rectangle(sides, shape)
    clipped = _clip_polygon(poly + 0.5, float(shape[1]), float(shape[0]))  # pixel-edge coordinates
    if len(clipped) < 3:
        return CarrierResult(False, None, whole, shape, reason="carrier outside the image")
    area = 0.5 * abs(float(np.sum(clipped[:, 0] * np.roll(clipped[:, 1], -1)
                                  - np.roll(clipped[:, 0], -1) * clipped[:, 1])))
    frac = area / float(shape[0] * shape[1])
    if frac < min_area:
        return CarrierResult(False, None, whole, shape, reason=f"carrier area {frac:.2f} below {min_area}")
    if frac > 0.995:
        return CarrierResult(False, None, whole, shape, reason="carrier is the whole image")
    x0, y0 = np.floor(clipped.min(axis=0)).astype(int)
    x1, y1 = np.ceil(clipped.max(axis=0)).astype(int)
    box = (max(0, int(y0)), min(shape[0], int(y1)), max(0, int(x0)), min(shape[1], int(x1)))
    score = float(sum(s.score for s in sides))
    slots = ",".join(s.slot for s in sides)
    return CarrierResult(True, poly, box, shape, score=score, sides=sides,
                         reason=f"{len(sides)} side(s) [{slots}] with straight border and uniform exterior")


# ------------------------------------------------------------------------------------ transforms
def _meta_update(meta: dict, res: CarrierResult) -> None:
    """Record the detection in a MetaTensor's ``meta`` (plain Python types, collate-friendly)."""
    y0, y1, x0, x1 = res.box
    meta["carrier_found"] = bool(res.found)
    meta["carrier_box"] = [int(y0), int(y1), int(x0), int(x1)]  # (y0, y1, x0, x1) in the input grid
    meta["carrier_input_shape"] = [int(res.shape[0]), int(res.shape[1])]
    meta["carrier_score"] = float(res.score)
    meta["carrier_sides"] = ",".join(s.slot for s in res.sides)
    if res.found and res.polygon is not None:
        meta["carrier_polygon"] = (res.polygon - np.array([x0, y0], dtype=np.float64)).tolist()  # crop (x, y)
    else:
        meta.pop("carrier_polygon", None)


class CropToCarrier(Crop):
    """Crop a channel-first radiograph ``(1, H, W)`` to its X-ray carrier (:func:`detect_carrier`).

    The crop is the axis-aligned bounding box of the carrier polygon clipped to the image (pixels are
    not resampled, so the crop is exact and invertible; a rotated carrier leaves small exterior corner
    triangles, whose polygon in crop coordinates is stored for the segmentation to ignore). Without a
    carrier the whole image is kept (an identity crop, still traced so ``inverse`` always applies).

    On a ``MetaTensor`` the metadata gets ``carrier_found`` (bool), ``carrier_box`` (``[y0, y1, x0,
    x1]`` in the input grid), ``carrier_input_shape``, ``carrier_score``, ``carrier_sides`` and, when
    found, ``carrier_polygon`` (4 ``[x, y]`` corners in crop coordinates); the trace
    (``applied_operations``) lets :meth:`inverse` pad an image, mask or map back to the input grid.
    numpy input gives numpy output (no trace).

    Args:
        work_size: long side of the working copy of :func:`detect_carrier`.
        **detect_kwargs: further :func:`detect_carrier` options.
    """

    backend = Crop.backend

    def __init__(self, work_size: int = 256, **detect_kwargs: Any) -> None:
        super().__init__(lazy=False)
        self.work_size = int(work_size)
        self.detect_kwargs = detect_kwargs

    def detect(self, img: Any) -> CarrierResult:
        """Carrier of ``img`` ``(1, H, W)``."""
        arr = single_channel(img, "CropToCarrier")
        return detect_carrier(arr, work_size=self.work_size, **self.detect_kwargs)

    def __call__(self, img: Any, result: CarrierResult | None = None, lazy: bool | None = None) -> Any:  # type: ignore[override]
        """``img (1, H, W)`` -> ``(1, h, w)`` cropped to the carrier (``result`` skips the detection)."""
        res = self.detect(img) if result is None else result
        y0, y1, x0, x1 = res.box
        out = super().__call__(img, (slice(y0, y1), slice(x0, x1)), lazy=False)
        if isinstance(out, MetaTensor):
            _meta_update(out.meta, res)
        if isinstance(img, np.ndarray):
            return convert_data_type(out, np.ndarray, dtype=img.dtype)[0]
        return out


class CropToCarrierd(MapTransform, InvertibleTransform):
    """Dictionary twin of :class:`CropToCarrier`: one detection (on ``source_key``), the same crop for all keys.

    Args:
        keys: keys to crop (e.g. ``("image", "mask")``; with ``allow_missing_keys`` a key that appears
            later in a pipeline, such as ``"mask"``, is inverted too).
        source_key: key the carrier is detected on (default: the first key present).
        work_size: long side of the working copy.
        allow_missing_keys: skip missing keys.
        **detect_kwargs: further :func:`detect_carrier` options.
    """

    backend = CropToCarrier.backend

    def __init__(self, keys: KeysCollection, source_key: str | None = None, work_size: int = 256,
                 allow_missing_keys: bool = False, **detect_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.cropper = CropToCarrier(work_size=work_size, **detect_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            return d
        src = self.source_key if self.source_key is not None else present[0]
        if src not in d:
            msg = f"CropToCarrierd: source key {src!r} not in the data (keys: {list(d)})"
            raise KeyError(msg)
        res = self.cropper.detect(d[src])
        for key in present:
            d[key] = self.cropper(d[key], result=res)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Pad every traced key back to the input grid (zeros where the exterior was cut)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


CropToCarrierD = CropToCarrierDict = CropToCarrierd
