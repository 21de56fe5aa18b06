"""Body-part segmentation of radiographs: exposure fields, local background, noise threshold.

The SALAD authors' MURA preprocessing segments the body part with histogram equalisation, a Yen
threshold ``t`` and a hysteresis sweep ``low = f * t`` (``f`` from 0.2 to 1.0) chosen by correlation
with the image, then an opening, the largest component and hole filling. MURA films show the body
part on a uniform carrier; real radiographs (FracAtlas, CR/DX DICOM; ``tests/data/masks`` holds 79
verified masks of them) show double exposures with dividers, fading detector strips, collimator
shutters, backgrounds with a heel effect, bodies filling the frame and burned-in labels. Here, on a
box-downsampled working copy (long side ``work_size``, default 256), Gaussian-smoothed:

1. **Non-field regions** are left out: unexposed bands (flat, bright, along the frame or the carrier
   border) with their ramp, and *straight bands* (:func:`_straight_bands`): the white divider of a
   double exposure with its penumbra strips, and uniform strips along the frame that end at background
   level. Lines are tested tilted up to ~4.6 degrees, on medians along the line (an arm crossing a
   strip does not hide it).
2. **Exposure fields**: the connected parts of what is left (two exposures, two backgrounds), cut
   apart along straight edges from frame to frame (:func:`_step_cuts`): steps flat on both sides (a
   collimator shutter's edge, the border of an unexposed panel, the seam of a second exposure
   collimated differently; also from the frame to such an edge or to a divider) and dividers (thin
   ridges with a field on each side, left out with their bright surroundings). A limb's outline is
   neither flat across nor closed at both ends (a limb enters from the frame and ends in the image).
3. **Background per field** (:func:`_field_background`): the grey level of the most populous dark
   histogram peak, kept where it connects to the field's border (air reaches the frame; dark anatomy
   such as lungs does not), then a smooth surface fitted to it (a quadratic trend for the heel effect
   plus a normalised convolution for local variation) and re-selected three times, so the background
   follows its gradient. A field whose "background" is as textured as anatomy has none: the body fills
   it (an infant filling the frame, a chest). Where the background brightens steeply towards a side
   (scatter, heel effect) the surface misses it: a *border glow* (:func:`_border_glow`), flat along the
   side and fading to the surface, is added to it.
4. **Body** = hysteresis on the contrast to that surface: low ``max(4 sigma, 0.012) + 0.005``, high
   ``max(8 sigma, 0.08)`` (``sigma``: the background's spread about the surface): soft tissue to the
   skin line, thin fingers included.
5. The **shutter band of one exposure** of a double exposure (:func:`_side_bands`): bright from the
   frame to a straight falling step, from a frame corner along >= 25 % of the side (often to the
   divider), joined to the limb running into it; left out of the body up to its edge + 2 px.
6. Opening, components (flat components along the frame/carrier border are bands, and so are glows
   along a side of the frame, fading from it: :func:`_is_glow_band`; others >= ``keep_fraction`` of the
   largest are kept: two limbs), then holes filled unless they are at
   background level (air enclosed by a hand making a ring, or between fixator bars, stays out).
7. Pixels outside a detected carrier (:mod:`preprocessing.carrier`), minus 2 working px of its border
   blur, are background.

The body part includes soft tissue, casts and implants; burned-in markers and labels apart from the
body are background.

Known limit: a limb of constant profile crossing the whole frame, straight to the pixel, cannot be
told from a divider with penumbra (no real limb does both).

Example:
    >>> mask = segment_body_part(img)                 # (H, W) bool; img (H, W) float in [0, 1]
    >>> m = SegmentBodyPart()(img[None])              # (1, H, W) same type as the input
    >>> d = SegmentBodyPartd(keys="image")({"image": img[None]})   # d["mask"] (1, H, W)

See Also:
    :mod:`preprocessing.carrier`, :mod:`preprocessing.pipelines`, ``benchmarks/mask_quality.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage as ndi
from skimage import filters
from skimage.transform import hough_line

from preprocessing.carrier import (
    CarrierResult,
    block_reduce,
    detect_carrier,
    exact_median,
    finite,
    least_squares,
    line_fit_rows,
    local_range,
    masked_median,
    plane_2d,
    polygon_mask,
    robust_line,
    single_channel,
    work_copy,
)
from preprocessing.kernels import edge_flags, edge_runs, line_counts, line_medians
from preprocessing.morphology import gaussian, label, max_filter, min_filter

__all__ = [
    "segment_body_part",
    "SegmentBodyPart",
    "SegmentBodyPartd",
    "SegmentBodyPartD",
    "SegmentBodyPartDict",
]

def _no_body(reason: str) -> ValueError:
    return ValueError(f"no body part found: {reason}")


def _flat_bright(g: np.ndarray, valid: np.ndarray, t: float, min_area: float, grow: int = 4) -> np.ndarray:
    """Unexposed bands: flat regions above ``t``, band-shaped, along the frame or the carrier border.

    Collimator shutters and the strip beyond a detector edge are bright, flat and run along a whole
    side; saturated anatomy (a dense abdomen clipped to white) is flat and bright too, but is not a
    band, so the region must span >= 60 % of the frame side it lies along, lie along it (not just
    touch it with one end, as a long bone does) and fill >= 50 % of its bounding box. A band that the
    body touches may run into flat saturated bone there (a spine against the shutter, RG2_JPLL): when a
    region spanning the side fails the fill test, its part made of straight runs along the side (>= 30 %
    of the side long; bone patches are shorter) is tested instead. The result is grown by ``grow`` px
    into the band's bright ramp (penumbra).
    """
    rng = local_range(g, 5)
    flat = (rng < 0.04) & (g >= t) & valid
    if not flat.any():
        return flat
    edge = _edge_of(valid)
    h, w = g.shape
    out, leaked = _border_bands(flat, edge, min_area)
    for sl, vertical in leaked:  # the straight part along the side of a region that leaked into anatomy
        length = max(3, int(0.3 * (h if vertical else w)))
        sub = flat[sl].view(np.uint8)
        window = (length, 1) if vertical else (1, length)
        core = max_filter(min_filter(sub, window), window).astype(bool)
        if core.any():
            whole = np.zeros_like(flat)
            whole[sl] = core
            out |= _border_bands(whole, edge, min_area)[0]
    return _grow(out, grow) & (g >= 0.5 * t) if out.any() else out  # + its ramp


def _inner_edge_straightness(region: np.ndarray, vertical: bool, left_or_top: bool, tol: float = 2.0) -> float:
    """Share of a band's lines (rows of a band along a left/right side, else columns) whose innermost pixel lies
    within ``tol`` px of the robust line through them (``region``: the band within its bounding box)."""
    a = region if vertical else region.T
    lines = np.flatnonzero(a.any(axis=1))
    if lines.size < 3:
        return 1.0
    cols = np.arange(a.shape[1])
    inner = np.where(a[lines], cols, -1).max(axis=1) if left_or_top else \
        np.where(a[lines], cols, a.shape[1]).min(axis=1)
    t = lines.astype(np.float64)
    c, b = robust_line(t, inner.astype(np.float64))
    return float(np.mean(np.abs(inner - (c + b * t)) <= tol))


def _border_bands(flat: np.ndarray, edge: np.ndarray, min_area: float, full_span: float = 0.9,
                  min_straight: float = 0.6) -> tuple[np.ndarray, list]:
    """The band-shaped regions of ``flat`` along ``edge`` (see :func:`_flat_bright`), and the bounding box and
    orientation (``True``: along a left/right side) of each region that spans a side but fails the fill test.

    A shutter's band runs the whole side (>= ``full_span`` of it: the blade crosses the field) or has a straight
    inner edge (the blade's shadow: >= ``min_straight`` of its rows within 2 px of a line); a region doing
    neither, an irregular flat white patch along part of a side, is anatomy clipped to white by the display
    window (a dense abdomen or pelvis filling the lower frame: FracAtlas IMG0000673, IMG0001608, IMG0003774:
    spans 0.61-0.67 of the side, 14-49 % of their rows on a line; of the 28 bands of the 311 FracAtlas and DICOM
    files, those spanning less than 0.9 of their side, 0.77-0.86, have >= 85 % of their rows on a line)."""
    lab, n = label(flat)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    touching = np.zeros(n + 1, dtype=bool)
    touching[lab[edge & flat]] = True
    contact = np.bincount(lab[edge & flat], minlength=n + 1)  # length along the frame / carrier border
    keep = np.zeros(n + 1, dtype=bool)
    leaked = []
    h, w = flat.shape
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None or not touching[i] or sizes[i] < min_area:
            continue
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        span = max(bh / h, bw / w)
        along = contact[i] >= max(bh, bw)  # lies along the border (the 2-px edge band)
        vertical = bh / h >= bw / w
        if span < 0.6 or not along:
            continue
        keep[i] = sizes[i] >= 0.5 * bh * bw
        if not keep[i]:
            leaked.append((sl, vertical))
        elif span < full_span:  # not the whole side: its inner edge must be a blade's straight shadow
            near_start = (sl[1].start + sl[1].stop < w) if vertical else (sl[0].start + sl[0].stop < h)
            keep[i] = _inner_edge_straightness(lab[sl] == i, vertical, near_start) >= min_straight
    return keep[lab], leaked


_CORE_TOL, _CORE_AGREE = 0.08, 0.7  # a divider's white core: bright samples agree (casts, bones vary)
_SHEARS = (-0.08, -0.06, -0.04, -0.02, 0.0, 0.02, 0.04, 0.06, 0.08)  # tilts of straight bands (<= ~4.6 deg)


@functools.lru_cache(maxsize=8)
def _line_samples(h: int, w: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Row step and ``(S, R, W)`` column index (clipped) and in-frame flag of every tilted line of
    :data:`_SHEARS` at every step-th row (cached per shape; read-only)."""
    step = max(1, h // 128)  # along a line every step-th row is enough for its statistics
    cols = np.stack([_sheared_columns((h, w), s)[::step] for s in _SHEARS])
    inside = (cols >= 0) & (cols < w)
    cc = np.clip(cols, 0, w - 1)
    cc.flags.writeable = False
    inside.flags.writeable = False
    return step, cc, inside


@functools.lru_cache(maxsize=8)
def _line_flat(h: int, w: int) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`_line_samples` laid out line by line: row step, ``(S, W, R)`` flat indices into a C-ordered
    ``(h, w)`` image (``np.take`` on its ``ravel()``: ~5x faster than 2-d fancy indexing, and the
    reductions along a line run over contiguous memory) and the in-frame flags (cached; read-only)."""
    step, cc, inside = _line_samples(h, w)
    rows = np.arange(0, h, step, dtype=np.intp)[None, :, None]
    flat = np.ascontiguousarray((rows * w + cc).transpose(0, 2, 1))
    inside_t = np.ascontiguousarray(inside.transpose(0, 2, 1))
    flat.flags.writeable = False
    inside_t.flags.writeable = False
    return step, flat, inside_t


@functools.lru_cache(maxsize=16)
def _shear_index(h: int, w: int, step: int, m: int) -> tuple[int, np.ndarray]:
    """Padding and ``(S, R, w + 2 m)`` flat indices into the ``(h, w + 2 pad)`` padded image: every
    step-th row of each tilt of :data:`_SHEARS` sheared into a straight line, ``m`` columns beyond each
    side (for :func:`_edge_runs`; cached, read-only)."""
    off = np.stack([_sheared_columns((h, 1), sh)[::step, 0] for sh in _SHEARS])  # (S, R) column of x = 0
    pad = m + int(np.abs(off).max())
    rows = np.arange(0, h, step, dtype=np.intp)[None, :, None]
    j = np.arange(w + 2 * m)[None, None, :] + off[:, :, None] + (pad - m)
    index = rows * (w + 2 * pad) + j
    index.flags.writeable = False
    return pad, index


@functools.lru_cache(maxsize=8)
def _edge_grid(h: int, w: int, d: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The samples of :func:`_edge_runs` (every k-th of :func:`_line_samples`, ~100 along a line): row step,
    ``(S, R, W)`` columns, in-frame flags, both sides ``d`` px away in the frame, and flat indices into a
    C-ordered ``(h, w)`` image (cached per shape; read-only)."""
    step, cc, inside = _line_samples(h, w)
    k = max(1, round(cc.shape[1] / 100))
    cc, inside, step = cc[:, ::k], inside[:, ::k], step * k
    ok = inside & (cc >= d + 3) & (cc < w - d - 3)
    flat = np.arange(0, h, step, dtype=np.intp)[None, :, None] * w + cc
    for a in (ok, flat):
        a.flags.writeable = False
    return step, cc, inside, ok, flat


def _sheared_columns(shape: tuple[int, int], shear: float) -> np.ndarray:
    """(h, w) column index of the line ``x = x0 + shear * (y - yc)`` through each ``x0`` (may leave the frame)."""
    h, w = shape
    yy = np.arange(h, dtype=np.float64)[:, None] - (h - 1) / 2.0
    return np.rint(np.arange(w, dtype=np.float64)[None, :] + shear * yy).astype(np.intp)


def _upper_median(v: np.ndarray, axis: int) -> np.ndarray:
    """Median along ``axis`` (upper middle element; ``np.partition``, ~6x faster than ``np.median``)."""
    k = v.shape[axis] // 2
    return np.take(np.partition(v, k, axis=axis), k, axis=axis)


def _band_lines(g: np.ndarray, valid: np.ndarray, bright_level: float, ceiling: float, tol: float,
                min_span: float = 0.85, max_width: float = 0.15, min_uniform: float = 0.7,
                min_bright: float = 0.6, min_strip: int = 4) -> np.ndarray:
    """Straight non-field bands across ``g`` (vertical, tilted up to ~4.6 degrees): (h, w) bool.

    Lines are indexed by the column ``x0`` where they cross the middle row; each takes the tilt of
    :data:`_SHEARS` along which it is most uniform (the white core of a divider and its penumbra strips
    may tilt differently). A line is *uniform* when >= ``min_uniform`` of its valid samples lie within
    ``tol`` of its median. A *core* is a run of adjacent lines that are bright (unexposed, ``>= bright_level``) on >=
    ``min_bright`` of their valid length: the white band between two exposures (it may fade to a grey
    strip over part of the length). From a core the
    band is extended line by line while the line lies above the background ``ceiling`` and is uniform
    (penumbra, the edge strip of an exposure; up to 5 non-uniform lines in a row are crossed: the
    blurred step between two strips), or uniform apart from unexposed white (``>= bright_level``) on
    <= half of it: a wedge-shaped core, narrowing to a point along the divider, crosses the strips next
    to it (FracAtlas IMG0002181), as may a shutter band at their end; a core counts only when the
    extensions on both sides end at background level (fields on both sides; one side suffices for an
    unexposed white core, median >= 0.9, when a limb touches the other) and add >= ``min_strip`` lines
    of strips (a nail, a cortex or a cast is bordered by anatomy or lies on background directly, a cast
    is greyer; a fixator bar has no strips). From a frame side, a run of such (plainly uniform) lines is
    a strip when it ends at background level within ``max_width`` of the side.
    """
    h, w = g.shape
    step, flat_all, inside_all = _line_flat(h, w)  # (S, W, R): every tilted line's samples, contiguous
    n_rows = flat_all.shape[2]
    max_d = max(2, int(max_width * w))
    # only lines that can matter: near the frame sides, or within reach of a possible core (a line
    # that is bright on >= 10 % of its length untilted; a tilted core drifts <= 0.08 h / 2)
    reach = max_d + 7 + int(0.04 * h)
    bright = g >= bright_level
    cand = (bright[::step] & valid[::step]).mean(axis=0) >= 0.1
    cand = ndi.maximum_filter1d(cand.view(np.uint8), 2 * reach + 1).astype(bool)
    cand[: max_d + 7] = True
    cand[w - max_d - 7:] = True
    sel = np.flatnonzero(cand)
    at_sel = np.full(w, -1, dtype=np.intp)  # column -> its place in sel (-1: never looked at)
    at_sel[sel] = np.arange(sel.size)
    g_flat, valid_flat, bright_flat = g.ravel(), valid.ravel(), bright.ravel()
    n_valid, n_lit = line_counts(valid, bright, flat_all, inside_all, sel)  # (S, Wc) valid, at unexposed white
    n_ok = np.maximum(n_valid, 1)
    k = n_rows // 2
    n_s = len(_SHEARS)
    tilt_cost = 0.01 * np.abs(np.asarray(_SHEARS))  # ties: the least tilt
    spans, brights = np.zeros((n_s, w)), np.zeros((n_s, w))
    spans[:, sel] = n_valid / float(n_rows)
    ratio = n_lit / n_ok

    def samples(ks: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ok, lit, v)``, ``(n, R)`` each, of the lines ``(ks, xs)``: valid samples, those at unexposed
        white, the values."""
        f = flat_all[ks, xs]
        o = inside_all[ks, xs] & np.take(valid_flat, f)
        return o, o & np.take(bright_flat, f), np.take(g_flat, f)

    # the bright samples agree (a cast or a bone varies along its length); only a line bright on
    # >= min_bright of it can be a core, so only those are checked (the others' value never matters)
    maybe = np.nonzero(ratio >= min_bright)
    if maybe[0].size:
        _, lit_m, v_m = samples(maybe[0], sel[maybe[1]])
        n_m = n_lit[maybe]
        lit_mean = np.where(lit_m, v_m, 0.0).sum(axis=1) / np.maximum(n_m, 1)
        agree = (lit_m & (np.abs(v_m - lit_mean[:, None]) <= _CORE_TOL)).sum(axis=1) >= _CORE_AGREE * n_m
        brights[maybe[0], sel[maybe[1]]] = np.where(agree, ratio[maybe], 0.0)
    at = np.arange(w)
    core_k = np.argmax(brights, axis=0)
    core = (brights[core_k, at] >= min_bright) & (spans[core_k, at] >= min_span)
    if core.any():  # a band runs from frame to frame: no background at either end
        xs = np.flatnonzero(core)
        end = max(2, n_rows // 16)
        f = flat_all[core_k[xs], xs]
        core[xs] = (np.take(g_flat, f[:, :end]).mean(axis=1) > ceiling) & (np.take(g_flat, f[:, -end:]).mean(axis=1)
                                                                             > ceiling)
    any_core = bool(core.any())

    # A line's median and uniformity (the costly part: a partial sort per line) only for the lines a
    # band's extension reaches or a core holds, computed on first use; a line never looked at keeps
    # median -1 (it stops any extension) as does one off `sel`.
    meds, uni = np.full((n_s, w), -1.0), np.zeros((n_s, w))
    uni_dim = np.zeros((n_s, w))  # uniform apart from unexposed white (for the extension from a core)
    done = ~cand  # (off sel: nothing to compute)

    def compute(xs: np.ndarray) -> None:
        """Medians and uniformity of the tilted lines through columns ``xs`` (in ``sel``)."""
        j = at_sel[xs]
        # invalid samples count as -1 (they sort first; few); near: valid samples within tol of the median
        med, n_near, n_near_dim = line_medians(g, valid, bright, flat_all, inside_all, xs, k, tol)
        u = n_near / n_ok[:, j]
        meds[:, xs], uni[:, xs] = med, u
        # a divider's core widening along its length, a shutter band at its end: the strips next to a
        # wedge-shaped core are uniform apart from the unexposed white crossing them, on <= half of the line
        n_dim = n_ok[:, j] - n_lit[:, j]
        uni_dim[:, xs] = np.maximum(u, np.where(n_dim >= 0.5 * n_ok[:, j], n_near_dim / np.maximum(n_dim, 1), 0.0))
        done[xs] = True

    def ensure(xs: np.ndarray) -> None:
        todo = xs[~done[xs]]
        if todo.size:
            compute(todo)

    def line(x: int, by_core: bool, ahead: int = 1) -> tuple[float, float, float, int]:
        """Column ``x``'s most uniform tilt: ``(uniformity, median, span, tilt index)``; from a core,
        uniform apart from unexposed white counts too. Computes the lines up to ``ahead - 1`` columns
        beyond ``x`` too (signed: the direction of a walk)."""
        if not done[x]:
            ensure(np.arange(x, min(w, max(-1, x + ahead)), 1 if ahead > 0 else -1))
        u = uni_dim if by_core and any_core else uni
        b = int(np.argmax(u[:, x] - tilt_cost))
        return float(u[b, x]), float(meds[b, x]), float(spans[b, x]), b

    def ends_level(ks: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The darker of the two ends of lines ``(ks, xs)`` (mean of their first and last 3 valid samples,
        not the carrier's exterior beyond them): a band crossing the field stays above background there,
        a limb ending inside the field (a bone with its soft tissue) comes down to it."""
        o, _, vv = samples(ks, xs)
        seen = np.cumsum(o, axis=1)
        head, tail = o & (seen <= 3), o & (seen > seen[:, -1:] - 3)
        return np.minimum(np.where(head, vv, 0.0).sum(axis=1) / np.maximum(head.sum(axis=1), 1),
                          np.where(tail, vv, 0.0).sum(axis=1) / np.maximum(tail.sum(axis=1), 1))

    def extend(x: int, step: int, band: np.ndarray, gap: int = 5, by_core: bool = False) -> bool:
        """Mark lines from ``x`` outwards; True when the run ends at background level (when it ends in
        anatomy instead, its trailing non-uniform lines are left out)."""
        seen: list[int] = []
        miss, ahead = 0, 1  # lines computed ahead of the walk: most walks stop at once, long ones go far
        while 0 <= x < w and len(seen) < max_d:
            if not done[x]:
                ahead = min(2 * ahead, 16)
            uniform, med, span, _ = line(x, by_core, ahead * step)
            if not (med > ceiling and span >= min_span):
                break
            miss = 0 if uniform >= min_uniform else miss + 1
            if miss > gap:
                break
            seen.append(x)
            x += step
        ended = 0 <= x < w and len(seen) < max_d and miss <= gap and line(x, by_core)[1] <= ceiling
        if not ended and miss:
            seen = seen[: len(seen) - min(miss, len(seen))]
        band[seen] = True
        return ended

    band = np.zeros(w, dtype=bool)
    band_core = np.zeros(w, dtype=bool)
    lab, n = label(core)
    for i in range(1, n + 1):
        idx = np.flatnonzero(lab == i)
        if idx.size > max_width * w:
            continue
        part = np.zeros(w, dtype=bool)
        part[idx] = True
        left = extend(idx[0] - 1, -1, part, by_core=True)
        right = extend(idx[-1] + 1, 1, part, by_core=True)
        if float(ends_level(core_k[idx], idx).min()) <= ceiling:
            continue  # the core comes down to background at an end of the field: a bone, not a divider
        ensure(idx)
        white = exact_median(meds[core_k[idx], idx]) >= 0.9  # unexposed white, not a cast (~0.8)
        if (left and right or white and (left or right)) and part.sum() - idx.size >= min_strip:
            band_core |= part  # fields on both sides (on one side when white: a limb may touch the other)
    for start, step in ((0, 1), (w - 1, -1)):  # strips along the frame sides
        part = np.zeros(w, dtype=bool)
        if extend(start, step, part) and part.sum() >= 2:
            band |= part
    shear_of = core_k.copy()  # each band line's tilt: its core's, else the one its extension took
    for x in np.flatnonzero((band | band_core) & ~core):
        shear_of[x] = line(int(x), by_core=bool(band_core[x]))[3]
    out = np.zeros((h, w), dtype=bool)
    band |= band_core
    for k, shear in enumerate(_SHEARS):
        sel = band & (shear_of == k)
        if sel.any():
            cols = _sheared_columns((h, w), shear)
            out |= _scatter(sel[None, :] & (cols >= 0) & (cols < w), np.clip(cols, 0, w - 1), (h, w))
    return out & valid


def _steepest_falls(p: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int, d: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``p`` (rows: distance from the frame) the steepest falling step ``p[i - d] - p[i + d]``
    with ``lo <= i <= hi`` (per column or scalars; ``d <= lo``, ``hi <= len(p) - d - 1``).

    Returns:
        ``(i, position, size, lead)``: its row, its sub-pixel position (the vertex of a parabola through
        the step sizes at ``i - 1 .. i + 1``), its size, and the band's brightness lead (the least of
        ``p[1 : i - d]``, the frame's own edge pixel left out, minus the step's foot ``p[i + d]``).
    """
    drop = p[: -2 * d] - p[2 * d:]  # row k: the step at i = k + d
    rows = np.arange(d, d + drop.shape[0])[:, None]
    k = np.argmax(np.where((rows >= lo) & (rows <= hi), drop, -np.inf), axis=0)
    at = np.arange(p.shape[1])
    left, mid, right = drop[np.maximum(k - 1, 0), at], drop[k, at], drop[np.minimum(k + 1, len(drop) - 1), at]
    curve = left - 2.0 * mid + right
    shift = np.clip(0.5 * (left - right) / np.where(curve < 0, curve, -np.inf), -0.5, 0.5)
    i = k + d
    top = np.minimum.accumulate(p[1:], axis=0)[np.maximum(i - d - 1, 0), at]
    return i, i + shift, mid, top - p[i + d, at]


def _side_band_rows(a: np.ndarray, ok: np.ndarray, min_step: float = 0.3, d: int = 2, min_depth: float = 6.0,
                    max_depth: float = 0.25, min_run: float = 0.25, max_gap: float = 0.3, corner: float = 0.03,
                    tol: float = 2.5, min_inliers: float = 0.8, max_tilt: float = 0.08, margin: int = 2,
                    slack: int = 6) -> np.ndarray:
    """Depth of a shutter band along the side ``a[0]`` of ``a`` (rows: distance from that side, columns:
    lines perpendicular to it), per line: ``(n,)`` int, 0 where there is none (see :func:`_side_bands`).

    Per line the band is bright from the frame to the line's steepest falling step (:func:`_steepest_falls`),
    a step >= ``min_step`` lying ``min_depth`` px to ``max_depth`` of the depth from the frame with the band
    >= ``min_step`` above its foot. A band starts at a frame corner (a step within ``corner`` of the side's
    end) and its steps lie on a straight line: fitted robustly to the steps in the first ``min_run`` of
    the side (>= ``min_inliers`` of them within ``tol`` px of it; its slope limited to ``max_tilt``), then
    followed along the side while steps lie on it, gaps of <= ``max_gap`` of the side bridged (a limb next
    to the band, the divider; the other exposure's band lies elsewhere), >= ``min_run`` of the side in all,
    refitted (slope <= ``max_tilt``); its median step lies >= ``min_depth`` px from the frame (each step's
    foot, ``d`` px further, at least). On each line of the run the band is cleared to its steepest step
    within ``slack`` px of the line (next to a limb the step is lower and blurred), >= ``min_step / 2``
    with the band as far above its foot, and ``margin`` px beyond (the penumbra); a line without one is
    cleared to the line where the band is as bright there as on a quarter of its steps at least (it hides
    the bone of a limb running into it), else left alone.
    """
    depth, n = a.shape
    reach = max(int(min_depth) + 1, int(max_depth * depth))
    if reach + d >= depth or n < 16:
        return np.zeros(n, dtype=np.intp)
    p = a[: reach + d + 1]
    at = np.arange(n)
    i, pos, size, lead = _steepest_falls(p, d, reach, d)
    found = (size >= min_step) & (lead >= min_step) & (i + d >= min_depth) & ok[i, at]  # its foot off the frame
    low = np.minimum.accumulate(p[1:], axis=0)  # row r: the least of p[1 : r + 2]
    out = np.zeros(n, dtype=np.intp)
    seed_n, gap = int(min_run * n), max(1, int(max_gap * n))
    for flip in (False, True):  # from either end of the side (a frame corner)
        f, y = (found[::-1], pos[::-1]) if flip else (found, pos)
        seed = np.flatnonzero(f[:seed_n])
        if seed.size < 8 or seed[0] > corner * n:
            continue
        c0, slope = robust_line(seed.astype(np.float64), y[seed])
        if abs(slope) > max_tilt:  # a short seed: its slope is uncertain
            slope = float(np.clip(slope, -max_tilt, max_tilt))
            c0 = exact_median(y[seed] - slope * seed)
        if np.mean(np.abs(y[seed] - (c0 + slope * seed)) <= tol) < min_inliers:
            continue
        idx = np.flatnonzero(f & (np.abs(y - (c0 + slope * at)) <= tol))  # steps on the line
        breaks = np.flatnonzero(np.diff(idx) > gap)
        run = idx[: breaks[0] + 1] if breaks.size else idx
        c0, slope = robust_line(run.astype(np.float64), y[run])
        end = int(run[-1]) + 1
        if end < min_run * n or abs(slope) > max_tilt or _upper_median(y[run], 0) < min_depth:
            continue
        line = np.rint(c0 + slope * at[:end]).astype(np.intp)
        lines = at[n - end:][::-1] if flip else at[:end]  # the run's lines in the original order
        q, _, s, le = _steepest_falls(p[:, lines], np.clip(line - slack, d, reach), np.clip(line + slack, d, reach), d)
        keep = (s >= 0.5 * min_step) & (le >= 0.5 * min_step)
        line = np.clip(line, d, reach)
        band = low[np.maximum(line - d - 1, 0), lines]  # the band's least brightness from the frame to the line
        level = np.quantile(low[np.maximum(y[run].astype(np.intp) - d - 1, 0), lines[run]], 0.25)
        hidden = ~keep & (band >= level)  # as bright as the band elsewhere: it hides a limb running into it
        depth_at = np.where(keep, q, np.where(hidden, line, -margin - 1))
        out[lines] = np.maximum(out[lines], depth_at + margin + 1)
    return out


def _side_bands(g: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Shutter bands of one exposure along the frame: (h, w) bool.

    In a double exposure one exposure's collimator may leave a bright flat band along a side of the frame
    over that exposure only (from a frame corner to the divider), too short for an unexposed band of the
    frame (:func:`_flat_bright`, :func:`_band_lines`) and joined to the limb next to it. Per side the band
    runs from the frame to a straight falling step (:func:`_side_band_rows`).
    """
    out = np.zeros(g.shape, dtype=bool)
    for a, ok, back in _sides(g, valid):
        rows = _side_band_rows(a, ok)
        if rows.any():
            out |= back(np.arange(a.shape[0])[:, None] < rows[None, :])
    return out


def _sides(g: np.ndarray, valid: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, Any], ...]:
    """Views of ``g`` and ``valid`` with each side of the frame first (top, bottom, left, right: row 0 is
    that side) and the function mapping an array on such a view back to the image grid."""
    return ((g, valid, lambda m: m), (g[::-1], valid[::-1], lambda m: m[::-1]),
            (g.T, valid.T, lambda m: m.T), (g.T[::-1], valid.T[::-1], lambda m: m[::-1].T))


def _scatter(sel: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool with ``True`` at ``(y, cols[y, i])`` where ``sel[y, i]``."""
    out = np.zeros(shape, dtype=bool)
    yy, ii = np.nonzero(sel)
    out[yy, cols[yy, ii]] = True
    return out


def _straight_bands(g: np.ndarray, valid: np.ndarray, t: float, ceiling: float) -> np.ndarray:
    """Unexposed or other non-field straight bands, both orientations: dividers between the exposures of
    a double exposure with their penumbra strips, and strips along the frame (see :func:`_band_lines`).
    """
    level, tol = max(t, 0.6), 0.04
    vertical = _band_lines(g, valid, level, ceiling, tol)
    gt, vt = np.ascontiguousarray(g.T), np.ascontiguousarray(valid.T)  # flat gathers need C order
    horizontal = _band_lines(gt, vt, level, ceiling, tol).T
    return vertical | horizontal


def _window_count(c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum over samples ``[lo, hi)`` (clipped) along axis 1 from ``c``, the cumulative sums with a leading 0."""
    n = c.shape[1] - 1
    lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
    return (np.take_along_axis(c, hi[:, None, :], 1) - np.take_along_axis(c, lo[:, None, :], 1))[:, 0, :]


def _cumsum0(b: np.ndarray) -> np.ndarray:
    """Cumulative sums along axis 1 with a leading 0 (for :func:`_window_count`)."""
    c = np.zeros((b.shape[0], b.shape[1] + 1, b.shape[2]), dtype=np.int32)
    np.cumsum(b, axis=1, dtype=np.int32, out=c[:, 1:])
    return c


_MIN_RUN = 0.2  # the shortest straight edge kept, as a fraction of the side (see _step_cuts)


def _edge_runs(g: np.ndarray, valid: np.ndarray, ceiling: float | None = None, min_step: float = 0.06,
               gap: float = 0.15, reach: float = 0.05, d: int = 2, flat_tol: float = 0.02, min_cover: float = 0.7,
               flank: float = 0.06) -> dict[str, Any]:
    """Runs of straight edges along the tilted vertical lines of :data:`_SHEARS` (see :func:`_step_cuts`).

    Per line and kind (rising step, falling step, thin bright ridge) the longest run of samples (~100
    along the line) showing the edge, gaps of <= ``gap`` of the line bridged (a limb crossing the edge)
    when >= ``min_cover`` of the run shows it. A *step* rises
    (falls) by >= ``min_step`` from ``d`` px before the line to ``d`` px beyond; a *ridge* (the thin white
    divider of a double exposure) lies >= ``min_step`` above both sides ``d + 1`` or ``d + 3`` px away and
    comes down to the background (``<= ceiling``; no ridges without it) within ``flank`` of the width on
    both sides: a field on each side (a straight bone has soft tissue around it). Both sides of a step are flat
    across the edge (the next 2 px within ``max(flat_tol, 0.2 x step)``): a panel, a shutter, a divider
    or the background; a bone's cortex or the soft tissue inside a skin line vary.

    Returns:
        ``{"step", "cc", "inside", "reach", "first", "last", "length", "head", "tail"}``: ``(3, S, W)``
        arrays for the kinds (rising, falling, ridge); ``head``/``tail``: the frame or the valid region's
        border within ``reach`` of the line before / after the run (a dark frame edge or a thin band
        along the frame apart), for a ridge also a line above the background (``> ceiling``) from the
        run's end to the frame (a divider running into a bright band along the frame whose edge is no
        straight step: limbs run into it, FracAtlas IMG0002598).
    """
    h, w = g.shape
    step, cc, inside, ok_frame, flat_index = _edge_grid(h, w, d)  # (S, R, W)
    n_rows = cc.shape[1]
    gap, reach = max(3, int(gap * n_rows)), max(2, int(reach * n_rows))
    # each tilt is a shift per row: shear the (padded) image once, then every offset is a slice
    flank = max(d + 3, int(flank * w))
    m = flank  # >= d + 3: the widest offset sampled
    pad, index = _shear_index(h, w, step, m)
    sheared = np.take(np.pad(g, ((0, 0), (pad, pad)), mode="edge").ravel(), index)  # (S, R, w + 2 m)

    def at(o: int) -> np.ndarray:
        return sheared[:, :, m + o: m + o + w]

    ok = ok_frame  # both sides d px away in the frame ...
    if not valid.all():  # ... and in the valid region
        vs = np.take(np.pad(valid, ((0, 0), (pad, pad))).ravel(), index)
        ok = ok & vs[:, :, m - d: m - d + w] & vs[:, :, m + d: m + d + w]
    need = int(_MIN_RUN * min_cover * n_rows)  # the shortest run kept shows the edge on this many samples
    # rising steps, falling steps, and ridges: a divider's core, 1 to 8 px wide (a wedge) and flanked by
    # grey penumbra strips, above both sides, that comes down to the background on both sides
    kinds = edge_flags(sheared, ok, m, d, flank, min_step, flat_tol, ceiling, need)
    first, last, length, head, tail = edge_runs(kinds, ok, inside, sheared, m, need, gap, reach, min_cover, ceiling)
    return {"step": step, "cc": cc, "flat": flat_index, "inside": inside, "reach": reach,
            "first": first, "last": last, "length": length, "head": head, "tail": tail}


def _closed_lines(runs: dict[str, Any], shape: tuple[int, int], kinds: Sequence[int], min_run: float,
                  stop: np.ndarray | None = None, long_run: float = 2.0, open_end: bool = False) -> np.ndarray:
    """(h, w) bool, 1 px per row: the runs of ``kinds`` (:func:`_edge_runs`) >= ``min_run`` of the height
    that are *closed*: each end at the frame or the valid region's border or, with ``stop``, within the
    runs' ``reach`` of ``stop`` (a perpendicular edge), or one end there and the run >= ``long_run`` of
    the height; with ``open_end`` one end suffices (candidates). Per line the longest. (A run from the
    frame ending in the open is a limb's outline: a limb enters from the frame and ends in the image.)"""
    h, w = shape
    kinds = list(kinds)  # fancy indexing: copies
    head, tail, length = runs["head"][kinds], runs["tail"][kinds], runs["length"][kinds]
    n_rows, reach, step = runs["cc"].shape[1], runs["reach"], runs["step"]
    shortest = max(min_run * n_rows, 10.0 / step)
    if not (length >= shortest).any():  # no run long enough, closed or not
        return np.zeros((h, w), dtype=bool)
    first, last = runs["first"][kinds], runs["last"][kinds]
    if stop is not None:  # (on the lines holding a long enough run only)
        cols = np.flatnonzero((length >= shortest).any(axis=(0, 1)))
        near = _grow(stop, max(2, reach * step // 2))  # an edge may end a few px short of the other
        sc = _cumsum0(np.take(near.ravel(), runs["flat"][:, :, cols]) & runs["inside"][:, :, cols])
        f, e = first[:, :, cols], last[:, :, cols]  # (head, tail: copies, indexed by the list of kinds)
        head[:, :, cols] |= np.stack([_window_count(sc, f[i] - reach, f[i]) > 0 for i in range(len(kinds))])
        tail[:, :, cols] |= np.stack([_window_count(sc, e[i] + 1, e[i] + 1 + reach) > 0 for i in range(len(kinds))])
    closed = (head & tail) | ((head | tail) & (open_end | (length >= long_run * n_rows)))
    length = np.where(closed, length, 0).reshape(-1, w)  # (kinds x S, lines)
    k = np.argmax(length, axis=0)
    best = length[k, np.arange(w)]
    out = np.zeros((h, w), dtype=bool)
    n_s = len(_SHEARS)
    first, last = first.reshape(-1, w), last.reshape(-1, w)
    for i in np.flatnonzero(best >= shortest):
        y0, y1 = int(first[k[i], i]) * step, min(h, (int(last[k[i], i]) + 1) * step)
        cols = _sheared_columns((h, w), _SHEARS[k[i] % n_s])[y0:y1, i]
        keep = (cols >= 0) & (cols < w)
        out[np.arange(y0, y1)[keep], cols[keep]] = True
    return out


def _step_cuts(g: np.ndarray, valid: np.ndarray, ceiling: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where exposure fields are cut apart: straight edges from frame to frame (:func:`_edge_runs`).

    A collimator shutter's edge, the border of an unexposed panel or the seam of a double exposure is a
    step flat on both sides from frame to frame (>= 50 % of the side), or from the frame to such an edge
    or to a divider (>= 20 %): the edge of a shutter in one exposure of two ends at the divider. The
    white divider of a double exposure is a thin ridge from frame to frame. Skin lines and bone outlines
    are not flat across, nor straight from frame to frame (a limb enters from the frame and ends in
    the image). ``ceiling``: the highest background level (see :func:`_edge_runs`).

    Returns:
        ``(cuts, ridges)``: (h, w) bool lines, 1 px per row (column), the steps and the ridges.
    """
    runs = (_edge_runs(g, valid, ceiling),
            _edge_runs(np.ascontiguousarray(g.T), np.ascontiguousarray(valid.T), ceiling))  # gathers: contiguous
    shapes = (g.shape, g.T.shape)
    steps = [0, 1]

    def both(fn: Any) -> list[np.ndarray]:
        """``fn(runs, shape, other)`` for the vertical and the horizontal lines, on the image grid; ``other``:
        the index of the perpendicular orientation (stops come from perpendicular lines only)."""
        return [fn(runs[0], shapes[0], 1), fn(runs[1], shapes[1], 0).T]

    def grid(lines: list[np.ndarray], o: int) -> np.ndarray:
        """Orientation ``o``'s lines (image grid) on the grid of the other orientation's runs."""
        return lines[o] if o == 1 else lines[o].T

    full = both(lambda r, sh, o: _closed_lines(r, sh, steps, 0.5))
    # a divider may end at an unexposed band along the frame: at its edge (a step from the frame on one
    # side at least, >= 20 % of the side; the band may be cut in two by the divider) or near the frame
    half = both(lambda r, sh, o: _closed_lines(r, sh, steps, _MIN_RUN, open_end=True))
    h, w = g.shape  # a band along the frame: its edge lies within 20 % of the side (not a fixator's bar)
    half[0][:, int(0.2 * w): w - int(0.2 * w)] = False
    half[1][int(0.2 * h): h - int(0.2 * h), :] = False
    ridges = both(lambda r, sh, o: _closed_lines(r, sh, [2], 0.5, grid(half, o), long_run=0.85))
    stop = [f | r for f, r in zip(full, ridges, strict=True)]
    for _ in range(2):  # edges ending at edges ending at the frame
        new = both(lambda r, sh, o, stop=stop: _closed_lines(r, sh, steps, _MIN_RUN, grid(stop, o))
                   if stop[o].any() else np.zeros(sh, dtype=bool))
        if not any((n & ~f).any() for n, f in zip(new, full, strict=True)):
            break
        full = [f | n for f, n in zip(full, new, strict=True)]
        stop = [f | n for f, n in zip(stop, new, strict=True)]
    return (full[0] | full[1]) & valid, (ridges[0] | ridges[1]) & valid


def _quadratic_fit(g: np.ndarray, weight: np.ndarray, max_samples: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients of ``a + b u + c v + d u^2 + e v^2 + f u v`` (``u, v`` in [-0.5, 0.5])
    of ``g`` over the ``weight`` pixels, and ``n (A^T A)^-1`` for the leverage of a point (``phi^T M phi``
    with ``phi = (1, u, v, u^2, v^2, u v)``: 6 on average over the ``n`` samples, growing as the fit
    extrapolates away from them)."""
    h, w = g.shape
    idx = np.flatnonzero(weight)
    yy, xx = np.divmod(idx[:: max(1, idx.size // max_samples)], w)
    u, v = xx / w - 0.5, yy / h - 0.5
    a = np.stack([np.ones(u.size), u, v, u * u, v * v, u * v], axis=1)
    normal = a.T @ a
    try:  # the normal equations' inverse serves both the fit and the leverage
        inverse = np.linalg.inv(normal)
    except np.linalg.LinAlgError:  # the samples on a line or fewer than 6 points: rank-deficient
        inverse = np.linalg.pinv(normal)
    return inverse @ (a.T @ g[yy, xx].astype(np.float64)), inverse * u.size


def _smooth_background(g: np.ndarray, weight: np.ndarray, scale: float = 0.08, far: float = 0.25,
                       max_leverage: float = 32.0) -> np.ndarray:
    """Slowly varying background surface from the ``weight`` pixels of ``g``.

    A quadratic trend (heel effect, vignetting), held beyond the background within the range it spans
    over it (a quadratic fitted to air along one side only, glowing towards the skin, bends steeply
    away from it: extrapolated, it rose to 0.35 across the frame and hid a darker limb there, FracAtlas
    IMG0000873, Dice 0.911 -> 0.989), plus the normalised convolution ``G(r * w) / G(w)`` of the
    residual ``r`` (scatter glow and other local variation) with a Gaussian of ``scale`` x the long
    side; far from any background pixel the residual term fades to 0. Computed on a 4x box-reduced grid
    and mapped back bilinearly.

    Where the quadratic is an extrapolation (its leverage ``phi^T n (A^T A)^-1 phi`` above ``max_leverage``;
    6 on average over the background, 20-60 along a side the background does not reach, hundreds across a
    body filling most of the frame) it is trusted in proportion ``max_leverage / leverage`` and otherwise
    held at the background's own trend nearby (a normalised convolution of the trend over the background
    with a Gaussian of ``far`` x the long side), never above the quadratic there: fitted to air in an L
    along two sides of a chest, the quadratic rose to 0.25 across it and took the lungs (0.2-0.3) for
    background (FracAtlas IMG0001194; ZhangLab films lost dark patches of lung). ``max_leverage`` 32:
    at 16 the glow along the top of NM_Kakadu44, which the quadratic follows, became body (Dice 0.98 -> 0.79).
    """
    h, w = g.shape
    coef, cov = _quadratic_fit(g, weight)
    f = 4 if min(h, w) >= 64 else 1
    wt = _block_sums(weight.astype(np.float32), f)
    gw = _block_sums(np.where(weight, g, 0).astype(np.float32), f)
    hs, ws = wt.shape
    u = np.broadcast_to(((np.arange(ws) + 0.5) * f / w - 0.5)[None, :], (hs, ws))  # block centres
    v = np.broadcast_to(((np.arange(hs) + 0.5) * f / h - 0.5)[:, None], (hs, ws))
    phi = np.stack([np.ones((hs, ws)), u, v, u * u, v * v, u * v], axis=-1)
    trend = phi @ coef
    seen = trend[wt > 0]
    if seen.size:
        trend = np.clip(trend, seen.min(), seen.max())
    leverage = ((phi @ cov) * phi).sum(axis=-1)
    hold = np.minimum(max_leverage / np.maximum(leverage, 1e-9), 1.0)
    if (hold < 1.0).any():
        # (on a 4x coarser grid again: the held trend varies over ~far x the long side; 0.24 -> 0.07 ms a filter)
        wide = far * max(h, w) / (4 * f)
        far_den = _bilinear_up(gaussian(_block_sums(wt, 4), wide, mode="nearest"), hs, ws, 4)
        far_num = _bilinear_up(gaussian(_block_sums(trend * wt, 4), wide, mode="nearest"), hs, ws, 4)
        held = np.where(far_den > 1e-6, np.minimum(far_num / np.maximum(far_den, 1e-6), trend), trend)
        trend = hold * trend + (1.0 - hold) * held
    sigma = max(1.0, scale * max(h, w) / f)
    num = gaussian(gw - trend * wt, sigma, mode="nearest")  # residual sums (trend ~flat in a block)
    den = gaussian(wt, sigma, mode="nearest")
    small = (trend + num / np.maximum(den, 1e-12) * np.minimum(den / (0.2 * f * f), 1.0)).astype(np.float32)
    return small if f == 1 else _bilinear_up(small, h, w, f)


def _block_sums(a: np.ndarray, f: int) -> np.ndarray:
    """Sums over ``f x f`` blocks (edge blocks padded with 0): ``(ceil(h / f), ceil(w / f))``."""
    if f == 1:
        return a
    h, w = a.shape
    hs, ws = -(-h // f), -(-w // f)
    if (hs * f, ws * f) != (h, w):
        a = np.pad(a, ((0, hs * f - h), (0, ws * f - w)))
    return block_reduce(a, f)


@functools.lru_cache(maxsize=8)
def _bilinear_index(n: int, n_small: int, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip((np.arange(n) + 0.5) / f - 0.5, 0, n_small - 1)
    i0 = np.floor(pos).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_small - 1), (pos - i0).astype(np.float32)


def _bilinear_up(small: np.ndarray, h: int, w: int, f: int) -> np.ndarray:
    """Bilinear map of block values (centres at ``f (i + 0.5)``) to the ``(h, w)`` pixel grid, separable."""
    r0, r1, fr = _bilinear_index(h, small.shape[0], f)
    c0, c1, fc = _bilinear_index(w, small.shape[1], f)
    rows = small[r0] * (1 - fr)[:, None] + small[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def _unit_histogram(v: np.ndarray, bins: int) -> np.ndarray:
    """``np.histogram(v, bins, range=(0, 1))[0]`` for a power-of-two ``bins``, 5x faster: ``v * bins`` is
    exact in binary floating point, so its integer part is the bin numpy finds (1.0 in the last bin;
    values outside [0, 1] and NaN are left out, as numpy does)."""
    v = np.ravel(v)
    inside = (v >= 0.0) & (v <= 1.0)
    if not inside.all():
        v = v[inside]
    index = (v * bins).astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    return np.bincount(index, minlength=bins)


def _histogram_peaks(v: np.ndarray, min_mass: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram peaks of ``v`` (128 bins over [0, 1], smoothed) holding >= ``min_mass`` of the values
    within +-4 bins: ``(bin centres, peak bins (darkest first), mass within +-4 bins)``."""
    hist = _unit_histogram(v, 128)
    edges = np.linspace(0.0, 1.0, 129)
    smooth = ndi.gaussian_filter1d(hist.astype(np.float64), 1.5)
    mass = ndi.uniform_filter1d(hist.astype(np.float64), 9, mode="constant") * 9
    centre = 0.5 * (edges[:-1] + edges[1:])
    below = np.concatenate([[-np.inf], smooth[:-1]])  # the neighbours, none beyond the ends (a wrap-around
    above = np.concatenate([smooth[1:], [-np.inf]])  # compared air clipped to 0 with saturated white)
    peaks = np.flatnonzero((smooth >= below) & (smooth >= above) & (hist > 0) & (mass >= min_mass * v.size))
    return centre, peaks, mass


def _dark_peaks(v: np.ndarray, min_mass: float = 0.03) -> list[float]:
    """Candidate background grey levels of ``v``, the likelier first (empty when there is no peak).

    Of the histogram peaks holding >= ``min_mass`` of the values (within +-4 of 128 bins): first the
    one holding the most among the darkest and those below the median (a thin dark divider, or a dark
    strip of exterior beyond a missed carrier side, holds less than the background next to it); then,
    when it differs, the one holding the most among the darkest and those within 0.12 of it (soft
    tissue or a trunk filling much of the frame can hold more than the air next to it, but it is
    brighter and textured: :func:`_field_background` takes the flatter of the two).
    """
    centre, peaks, mass = _histogram_peaks(v, min_mass)
    if not peaks.size:
        return []
    darkest = centre[peaks[0]]  # the darkest always counts
    mid = exact_median(v)
    below = peaks[(peaks == peaks[0]) | (centre[peaks] <= mid)]
    near = peaks[(peaks == peaks[0]) | ((centre[peaks] <= mid) & (centre[peaks] <= darkest + 0.12))]
    first, second = (float(centre[c[np.argmax(mass[c])]]) for c in (below, near))
    return [first] if second == first else [first, second]


def _frame_seeds(g: np.ndarray, field: np.ndarray, level: float, depth: int = 4) -> np.ndarray:
    """Where the background may reach the frame: the field's 1-px edge and, where a thin bright rim
    (brighter than ``level`` for 1 to ``depth`` px from a side of the frame: a detector's own bright edge)
    lines a side, the first pixel inside it. A body touching the frame is bright far deeper (``depth`` 4:
    the rims seen are 2-3 working px; with the whole 4-px band as seeds instead, a chest's darker edge
    joined the air of ZhangLab NORMAL2-IM-0651-0004 and its spread failed the background test)."""
    seeds = field & ~_shrink(field, 1)
    for a, ok, back in _sides(g, field):
        above = (a[: depth + 1] > level) & ok[: depth + 1]
        k = np.argmin(above, axis=0)  # the first pixel from the side not above the level
        cols = np.flatnonzero((k > 0) & ~above.all(axis=0))
        cols = cols[ok[k[cols], cols]]
        if cols.size:
            m = np.zeros(a.shape, dtype=bool)
            m[k[cols], cols] = True
            seeds |= back(m)
    return seeds


def _field_background(g: np.ndarray, field: np.ndarray, noise: float, iterations: int = 3,
                      peaks: list[float] | None = None) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Background of one exposure field: surface ``B``, noise ``sigma`` and the background pixels.

    Background is a dark substantial grey level (:func:`_dark_peaks`: the most populous one, or the
    darker candidate when its background is less than half as spread) *connected to the field's
    border* (air reaches the frame; dark anatomy such as lungs does not), also through a thin bright rim
    along a side of the frame (:func:`_frame_seeds`: a detector's bright edge, 2-4 working px, lines the
    frame of many FracAtlas images; where it ran all round, the air reached no border pixel, so the field
    "had no background" and its whole area became body, IMG0001516). Each round fits :func:`_smooth_background` to the
    current background pixels and takes as background the border-connected pixels less than
    ``max(3 sigma, 0.03)`` from it, so the set follows a gradient across the field (much darker pixels,
    such as a dark strip beyond a carrier border, stay out of the fit).

    Returns:
        ``(B (h, w), sigma, background (h, w) bool)``, or ``None`` when the field has no background (a
        body filling it): no dark peak, too few border-connected pixels, or a "background" as textured
        as anatomy (its spread about ``B`` above ``4 noise + 0.01``, ``noise`` being the pixel noise of
        the image: lungs when a chest fills the frame).
    """
    if peaks is None:  # (the caller passes them when it has them for these very pixels)
        peaks = _dark_peaks(g[field])
    found = [_background_from(g, field, noise, peak, iterations) for peak in peaks]
    found = [f for f in found if f is not None]
    if len(found) == 2 and found[1][1] < 0.5 * found[0][1]:
        return found[1]  # the darker level is a clearly flatter background: the other was soft tissue
    return found[0] if found else None


def _background_from(g: np.ndarray, field: np.ndarray, noise: float, peak: float, iterations: int
                     ) -> tuple[np.ndarray, float, np.ndarray] | None:
    """:func:`_field_background` starting from the background grey level ``peak``."""
    bg = field & (np.abs(g - peak) <= 0.06)  # darker outliers (a dark strip beyond a border) not included
    edge = _frame_seeds(g, field, peak + 0.06)
    sigma = 0.01
    for it in range(iterations):
        bg = _joined(bg, edge)
        if bg.sum() < max(30, 0.005 * field.sum()):
            return None
        surface = _smooth_background(g, bg)
        d = g - surface
        resid = d[bg]
        sigma = max(1.4826 * exact_median(np.abs(resid - resid.dtype.type(exact_median(resid)))), 0.003)
        if it < iterations - 1:
            bg = field & (np.abs(d) <= max(3.0 * sigma, 0.03))
    if sigma > 4.0 * noise + 0.01:
        return None
    return surface, sigma, bg


def _segment_field(g: np.ndarray, field: np.ndarray, noise: float, shutter_edge: np.ndarray | None = None,
                   peaks: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Body pixels of one field: above its local background by more than its noise (hysteresis).

    ``shutter_edge``: where an electronic shutter borders the field (:func:`_dark_shutter`); when the
    field has no background of its own by the test of :func:`_field_background`, its air along that
    edge is still left out (:func:`_air_along`). ``peaks``: :func:`_dark_peaks` of the field's pixels, if known.

    Returns:
        ``(mask, contrast)``: bool mask and ``g - B`` over the noise floor (``<= 0`` is background level).
    """
    found = _field_background(g, field, noise, peaks=peaks)
    if found is None:  # the body fills the field: all of it is body (bands and markers are removed later)
        air = _air_along(g, field, shutter_edge) if shutter_edge is not None else None
        if air is None:
            return field.copy(), np.where(field, 1.0, 0.0).astype(np.float32)
        body = field & ~air
        return body, np.where(body, 1.0, np.where(air, -1.0, 0.0)).astype(np.float32)
    surface, sigma, _ = found
    d = g - surface
    low = max(4.0 * sigma, 0.012) + 0.005
    high = max(8.0 * sigma, 0.08)
    glow = _border_glow(np.where(field, d, 0.0), field, max(4.0 * sigma, 0.02), high)
    if glow is not None:
        d = d - glow
    mask = _hysteresis(np.where(field, d, -1.0), low, high)
    return mask, (d - low).astype(np.float32)


def _air_along(g: np.ndarray, field: np.ndarray, edge: np.ndarray, tol: float = 0.05, max_share: float = 0.4
               ) -> np.ndarray | None:
    """The air of a field along an electronic shutter's edge, or ``None``.

    Behind an electronic shutter the collimated field's own air often lies in a strip along the shutter's
    edge only, the limb and other anatomy filling the rest (FracAtlas IMG0000007: a forearm, air between
    it and the shutter, soft tissue of the trunk beside it up to the frame): too little air, varying along
    the side, for a background surface (soft tissue as dark as that air joins it, and its spread fails the
    test). The strip: the field's pixels within ``tol`` above its darkest substantial grey level
    (:func:`_histogram_peaks`), joined to ``edge``; ``None`` when there is none or it holds more than
    ``max_share`` of the field (then the darkest level is anatomy filling the field, not a strip of air).
    On IMG0000007 the strip is 16 % of the field (Dice 0.854 -> 0.913; ``tol`` 0.03 .. 0.08: 0.922 ..
    0.906).
    """
    centre, peaks, _ = _histogram_peaks(g[field])
    if not peaks.size:
        return None
    air = _joined(field & (g <= centre[peaks[0]] + tol), edge)
    share = air.sum() / max(int(field.sum()), 1)
    return air if 0 < share <= max_share else None


def _border_glow(d: np.ndarray, field: np.ndarray, tol: float, body: float, max_depth: float = 0.3,
                 floor: float = 0.005, min_share: float = 0.5, min_flat: float = 0.7, rim: int = 8
                 ) -> np.ndarray | None:
    """Glow of the background along the field's border that its surface misses: (h, w) float, or ``None``.

    Scatter or the heel effect can brighten the background steeply towards a side of the field (up to
    ~0.3 above the rest over the last ~15 % of the side, NM_Kakadu44): the background surface
    (:func:`_smooth_background`, fitted where the background lies near its dark level) does not follow,
    and the glow becomes body. Per side, on the lines parallel to it at depth 0, 1, ... px from the
    field's border, the residual ``d`` (contrast to the surface) is fitted by a straight level along the
    side (robustly: the samples within ``tol`` of it are the background). The glow runs from the border
    while each line is background-like, ``>= min_share`` of its samples within ``tol`` of the fit and
    ``>= min_flat`` of those not clearly body (``<= fit + body``; a limb crossing the line is brighter),
    down to the surface (fit ``<= floor``) within ``max_depth`` of the field; a side whose lines are not
    flat before that (anatomy, a limb filling the side) has none, nor one whose line 1 px from the border
    lies at the surface already (median ``<= floor``: most sides, checked first). The first ``rim`` lines,
    the frame's own edge or a bright band's ramp along it, need not be flat (a bright uneven line at a
    detector's edge, or a band at the frame, before the glow: FracAtlas IMG0000630, IMG0001091, IMG0001567,
    IMG0004004, IMG0004009 kept strips of 6-11 % of the image as body, IMG0001870, IMG0001921, IMG0002444,
    IMG0002980, IMG0003519, IMG0004007 patches of 2-11 %; rims up to 7 working px deep); such a line takes the
    level of the next flat line, and the glow never ends on it (its fit is no level: a trunk filling a side
    lost a strip along the frame, IMG0003201).

    Args:
        d: (h, w) contrast to the background surface, 0 outside ``field``.
        field: (h, w) bool, the exposure field.
        tol: the background's spread about the fit.
        body: contrast of clear anatomy (the hysteresis' high threshold).

    Returns:
        (h, w) float32 glow (``>= 0``) to subtract from ``d``, or ``None`` when no side has any.
    """
    out = None
    for a, ok, back in _sides(d, field):
        n_rows, n = a.shape
        cols = np.flatnonzero(ok.any(axis=0))
        depth = int(max_depth * n_rows)
        if cols.size < 16 or depth < 3:
            continue
        first = ok[:, cols].argmax(axis=0)
        near = a[np.minimum(first + 1, n_rows - 1), cols][ok[np.minimum(first + 1, n_rows - 1), cols]]
        if near.size == 0 or float(_upper_median(near, 0)) <= floor:  # at the surface next to the border
            continue
        t = ((cols - 0.5 * (cols[0] + cols[-1])) / n).astype(np.float32)  # position along the side
        parts, end = [], 0
        forgiven = np.zeros(0, dtype=np.intp)  # rim lines let through although not flat
        for d0 in range(0, depth, 16):  # 16 lines at a time: most sides end within the first ones
            rows = first[None, :] + np.arange(d0, min(depth, d0 + 16))[:, None]  # (D, C): the lines
            inside = rows < n_rows
            rows = np.minimum(rows, n_rows - 1)
            v, m = a[rows, cols], ok[rows, cols] & inside
            fit = np.broadcast_to(masked_median(v, m)[:, None], v.shape)
            for _ in range(3):  # a level straight along the side, fitted to its background samples
                a0, b0 = line_fit_rows(t[None, :], v, m & (np.abs(v - fit) <= tol))
                fit = a0[:, None] + b0[:, None] * t[None, :]
            inl = (m & (np.abs(v - fit) <= tol)).sum(axis=1)
            n_ok = m.sum(axis=1)
            flat = ((n_ok >= 0.5 * cols.size) & (inl >= min_share * np.maximum(n_ok, 1))
                    & (inl >= min_flat * (m & (v <= fit + body)).sum(axis=1)))
            level = (np.where(m, fit, 0.0).sum(axis=1) / np.maximum(n_ok, 1)).astype(np.float32)
            parts.append((rows, m, fit))
            if d0 == 0:  # the field's own rim (a bright or blurred edge of the frame) need not be flat, but
                forgiven = np.flatnonzero(~flat[:rim])  # the glow does not end on such a line (its fit is no level)
                flat[:rim] = True
                level[forgiven] = np.inf
            k_flat = int(np.argmin(flat)) if not flat.all() else len(flat)  # background-like up to here
            low = np.flatnonzero(level[:k_flat] <= floor)
            if low.size:  # down to the surface within the run
                end = d0 + int(low[0]) + 1
                break
            if k_flat < len(flat):  # not background-like before it reached the surface: no glow
                break
        if end < 3:  # no glow (at the surface within 2 lines), or not down to the surface within the run
            continue
        rows, m, fit = (np.concatenate(x)[:end] for x in zip(*parts, strict=True))
        forgiven = forgiven[forgiven < end]
        if forgiven.size:  # such a rim line takes the level of the next flat line (the glow ends on one)
            fit = fit.copy()
            flat_lines = np.setdiff1d(np.arange(end), forgiven)
            fit[forgiven] = fit[flat_lines[np.searchsorted(flat_lines, forgiven)]]
        glow = np.zeros((n_rows, n), dtype=np.float32)
        glow[rows[m], np.broadcast_to(cols, m.shape)[m]] = np.maximum(fit[m], 0.0)
        out = back(glow) if out is None else np.maximum(out, back(glow))
    return out


def _exposure_fields(valid: np.ndarray, min_fraction: float = 0.04) -> list[np.ndarray]:
    """Connected parts of ``valid`` holding >= ``min_fraction`` of it (the exposures of one image)."""
    lab, n = label(valid)
    if n <= 1:
        return [valid] if n else []
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return [lab == i for i in np.flatnonzero(sizes >= min_fraction * valid.sum())]


def _two_hough_peaks(acc: np.ndarray, angles: np.ndarray, dists: np.ndarray, min_distance: int = 9,
                     min_angle: int = 10, threshold: float = 0.5) -> tuple[list[float], list[float]]:
    """The strongest line of a Hough accumulator ``acc (distances, angles)`` and the strongest one at least
    ``min_distance`` distance bins or ``min_angle`` angle bins from it, if it holds >= ``threshold`` of
    the first's votes: ``(angles, distances)`` of one or two lines (as ``skimage.transform.hough_line_peaks``
    with ``num_peaks=2`` picks them, by two arg-maxima instead of its peak search: 0.1 instead of 4 ms)."""
    i, j = np.unravel_index(int(np.argmax(acc)), acc.shape)
    out_a, out_d = [float(angles[j])], [float(dists[i])]
    rest = acc.copy()
    rest[max(0, i - min_distance + 1): i + min_distance, max(0, j - min_angle + 1): j + min_angle] = 0
    i2, j2 = np.unravel_index(int(np.argmax(rest)), rest.shape)
    if rest[i2, j2] > 0 and rest[i2, j2] >= threshold * acc[i, j]:
        out_a.append(float(angles[j2]))
        out_d.append(float(dists[i2]))
    return out_a, out_d


def _dark_shutter(g: np.ndarray, valid: np.ndarray, level: float, tol: float = 0.03, min_fraction: float = 0.1,
                  min_inliers: float = 0.8, line_tol: float = 1.5) -> np.ndarray | None:
    """An electronic (digital) shutter: the black exterior of a collimated field, or ``None``.

    Some systems blacken everything outside the collimated field (FracAtlas IMG0000007): a region at the
    darkest grey level (within ``tol`` of ``level``) joined to the frame or the carrier border, holding
    >= ``min_fraction`` of the valid region, whose border with the rest is straight: >= ``min_inliers``
    of its border pixels (the frame's own 2-px edge apart) within ``line_tol`` px of the two strongest
    straight lines (Hough). Air around a limb reaches the frame too, but its border is the skin line
    (on the 72 verified images at most 0.67 of it lies on two lines; the shutter: 0.86). Inside such
    a field the background is the field's own air, brighter than the shutter.
    """
    if min(g.shape) < 64:  # too few pixels to tell a straight edge from a skin line
        return None
    region = _joined(valid & (g <= level + tol), _edge_of(valid))
    if region.sum() < min_fraction * valid.sum():
        return None
    border = region & ~_shrink(region, 1, border_value=1) & ~_frame(g.shape)
    if border.sum() < 0.5 * min(g.shape):  # too short to tell a straight edge
        return None
    acc, angles, dists = hough_line(border, theta=np.linspace(-np.pi / 2, np.pi / 2, 360, endpoint=False))
    angle, dist = _two_hough_peaks(acc, angles, dists)
    yy, xx = np.nonzero(border)
    off = np.full(yy.size, np.inf)
    for a, d in zip(angle, dist, strict=True):
        off = np.minimum(off, np.abs(xx * np.cos(a) + yy * np.sin(a) - d))
    return region if float(np.mean(off <= line_tol)) >= min_inliers else None


def _pixel_noise(g: np.ndarray, valid: np.ndarray, bright: float = 0.9, floor: float = 0.003) -> float:
    """Pixel noise of the working image: robust spread of ``g`` about its 3x3 mean over ``valid``, leaving out
    the pixels the display window compresses or clips (``>= bright`` or ``<= 0.02``: a saturated abdomen or
    heart, smooth there, filling a third of a pediatric chest film lowered the estimate by a third, and the
    film's air became "as textured as anatomy", the whole frame body: ZhangLab person278_virus_575), unless
    they are most of the image; at least ``floor``."""
    keep = valid & (g > 0.02) & (g < bright)
    r = np.abs(g - ndi.uniform_filter(g, 3))[keep if keep.sum() >= 0.25 * valid.sum() else valid]
    return max(1.4826 * exact_median(r), floor)


def _segment_work(g: np.ndarray, valid: np.ndarray, keep_fraction: float, opening_radius: int,
                  raw: np.ndarray | None = None) -> np.ndarray:
    """Body-part mask on a smoothed working image ``g`` (``raw``: the same before smoothing) restricted to
    ``valid``; bool mask (h, w)."""
    vals = g[valid]
    if vals.size < 16 or float(vals.max() - vals.min()) < 1e-3:
        reason = "the image is constant"
        raise _no_body(reason)
    peaks = _dark_peaks(vals)
    shutter = _dark_shutter(g, valid, min(peaks)) if peaks else None
    if shutter is not None:  # an electronic shutter: outside the field, as beyond a carrier's border
        valid = valid & ~_grow(shutter, 1)
        vals = g[valid]
        peaks = _dark_peaks(vals)
    peaks_of = valid  # the pixels the peaks are of
    t = float(filters.threshold_yen(vals))
    region = valid  # the carrier's interior (before the bands are left out)
    bands = _flat_bright(g, valid, t, 0.01 * g.size, grow=6)  # unexposed bands: not part of the image
    if peaks:  # straight non-field bands: dividers of double exposures, strips along the frame (ceiling
        # above the darker candidate level: a band is brighter than any background next to it)
        lines = _straight_bands(g, valid, t, ceiling=peaks[-1] + 0.07)
        bands |= _grow(lines, 1) & (g >= peaks[-1] + 0.03) if lines.any() else lines
    if bands.any() and (valid & ~bands).sum() >= 0.25 * valid.sum():
        valid = valid & ~bands
    mask = np.zeros(g.shape, dtype=bool)
    contrast = np.full(g.shape, -1.0, dtype=np.float32)
    noise = _pixel_noise(g, valid)
    cuts, ridges = _step_cuts(g, valid, ceiling=peaks[-1] + 0.07 if peaks else None)
    if ridges.any() and peaks:  # a divider's white core and its penumbra strips: not part of either field
        cuts |= _grow(ridges, 4) & (g >= peaks[-1] + 0.03)
    shutter_edge = _grow(shutter, 3) if shutter is not None else None
    for field in _exposure_fields(valid & ~cuts):
        known = peaks if np.array_equal(field, peaks_of) else None  # one field: the whole valid region
        m, c = _segment_field(g, field, noise, shutter_edge, known)
        mask |= m
        contrast = np.where(field, c, contrast)
    if cuts.any():  # a cut through the body (a limb crossing a step edge) is closed again
        mask |= cuts & _shrink(_grow(mask, 1), 1)
    side = _side_bands(g, region)  # the shutter band of one exposure of a double exposure
    if side.any():
        mask &= ~side
    if opening_radius > 0:
        opened = _opening(mask, opening_radius)
        mask = opened if opened.any() else mask
    lab, n = label(mask)
    if n == 0:
        reason = "nothing above the background"
        raise _no_body(reason)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    # a flat component touching the frame or the carrier border is an exterior band, not anatomy
    edge = _edge_of(valid)
    for i in np.flatnonzero(sizes >= 0.02 * g.size):
        comp = lab == i
        if (comp & edge).any() and (_is_flat(g, comp) or _is_glow_band(comp, contrast)):
            sizes[i] = 0
    if not sizes.any():
        reason = "only flat bands at the border"
        raise _no_body(reason)
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    mask = _fill_holes(keep[lab], contrast)
    markers = _markers(g if raw is None else raw, valid, contrast)
    if markers.any():
        mask = mask & ~markers
    if not mask.any():
        reason = "only burned-in markers above the background"
        raise _no_body(reason)
    return mask


def _markers(x: np.ndarray, valid: np.ndarray, contrast: np.ndarray, level: float = 0.85,
             max_area: float = 0.015, max_extent: float = 0.15, min_outside: float = 0.4,
             min_saturated: float = 0.45, structure_level: float = 0.6, max_growth: float = 10.0,
             min_saturated_on_structure: float = 0.8) -> np.ndarray:
    """Burned-in markers and labels (L/R letters, label boxes, text) at the body's outline: (h, w) bool.

    On the block-maximum working image ``x`` (burned-in glyphs are sharp and at full brightness), a
    marker is a compact very bright component (>= ``level``; <= ``max_area`` of the image, bounding
    box <= ``max_extent`` of the long side; glyphs 2 px apart form one), saturated (>= ``min_saturated``
    of it >= 0.97), with >= ``min_outside`` of the ring 3 to 4 px around it at background level
    (``contrast <= 0``, past the blur of its own edge): burned in over the skin line or on the
    background. Bright anatomy and implants lie inside the body (their ring is body; the bones of thin
    fingers are rarely saturated), casts and nails are longer. Where a bone's end lies at the skin line and
    the display window clips it (FracAtlas IMG0000036: the tip of a thumb, 48 % of it saturated, its ring
    the air of the hand's hole and outline), it passes those tests; but it continues into the rest of the
    bone: a component whose connected pixels ``>= structure_level`` hold more than ``max_growth`` times its
    area is a marker only when ``>= min_saturated_on_structure`` of it is saturated (glyphs are drawn at
    full white: on the 72 reference files the letter lying on a limb 0.94, the other candidates on such a
    structure 0.48-0.67: bone ends, a fixator's clamp, a band's edge, fragments of <= 6 px; IMG0000036 Dice
    0.934 -> 0.964, IMG0002373 0.952 -> 0.959, IMG0000105 0.980 -> 0.983, no other mask changes;
    ``structure_level`` 0.5-0.6, ``max_growth`` 5-20 and ``min_saturated_on_structure`` 0.7-0.8 give the same
    masks). Its holes (a box's dark text) are part of it; the result is grown by 2 px (its blurred edge).
    """
    bright = (x >= level) & valid
    if not bright.any():
        return bright
    lab, n = label(_grow(bright, 1))  # glyphs of one label join
    lab = lab * bright
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    saturated = np.bincount(lab.ravel(), weights=(x >= 0.97).ravel(), minlength=n + 1)
    near = max_filter(lab, 5)  # the label within 2 px
    ring_lab = max_filter(lab, 9) * (near == 0)  # within 4 px but not within 2
    outside = np.bincount(ring_lab.ravel(), weights=(contrast <= 0).ravel(), minlength=n + 1)
    ring = np.bincount(ring_lab.ravel(), minlength=n + 1)
    h, w = x.shape
    keep = np.zeros(n + 1, dtype=bool)
    boxes = ndi.find_objects(lab)
    for i, sl in enumerate(boxes, start=1):
        if sl is None or sizes[i] > max_area * x.size or ring[i] == 0:
            continue
        extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        keep[i] = (extent <= max_extent * max(h, w) and outside[i] >= min_outside * ring[i]
                   and saturated[i] >= min_saturated * sizes[i])
    if not keep[1:].any():
        return np.zeros_like(bright)
    # bone clipped by the display window continues into bone: a candidate lying on a bright structure
    # much larger than itself is a marker only when drawn at full white (glyph strokes), not saturated in patches
    structure, _ = label((x >= structure_level) & valid)
    structure_sizes = np.bincount(structure.ravel())
    structure_sizes[0] = 0
    for i in np.flatnonzero(keep):
        sl = boxes[i - 1]
        on = structure_sizes[np.unique(structure[sl][lab[sl] == i])].sum()
        if on > max_growth * sizes[i] and saturated[i] < min_saturated_on_structure * sizes[i]:
            keep[i] = False
    if not keep[1:].any():
        return np.zeros_like(bright)
    return _grow(_fill_holes(_grow(keep[lab], 1)), 2)


def _is_glow_band(comp: np.ndarray, contrast: np.ndarray, min_span: float = 0.5, max_depth: float = 0.2,
                  typical_depth: float = 0.1, min_inside: float = 0.9, min_glow: float = 0.7, rim: int = 2) -> bool:
    """Whether a component is a glow along a side of the frame, fading from it: a band, not anatomy.

    A strong glow along a detector's edge can vary so much along the side (FracAtlas IMG0001921, IMG0003621:
    ~6x from one end of the bottom side to the other, with streaks) that no level straight along the side
    fits it, so :func:`_border_glow` leaves it in the contrast and it becomes a band of "body" along the frame
    (5-8 % of the image), apart from the limb. Such a component lies along the side (its pixels touch >=
    ``min_span`` of it, >= ``min_inside`` of them in the runs that start at the side; the runs ``typical_depth``
    of the image deep at the median, ``max_depth`` at most) and, in >= ``min_glow`` of its columns (runs of
    >= 4 px), its contrast falls steepest within the first third of the run (or the first ``rim`` + 1 px): a
    glow fades fastest at the frame, while a trunk, thigh or limb lying along the side, thickest there, falls
    steepest at its skin line, at the run's far end. Measured on the 311 FracAtlas and DICOM files: IMG0001921
    0.97 and IMG0003621 0.95 of the columns (both removed), the only other candidate (IMG0002500, a 3 %
    sliver that the component size test drops anyway) 0.54; none among the 1,741 ZhangLab films (0.14).

    Args:
        comp: (h, w) bool, the component.
        contrast: (h, w) contrast to the background (``<= 0`` at background level).
    """
    for a, m, _ in _sides(contrast, comp):
        n_rows, n = m.shape
        touch = m[0]
        if touch.sum() < min_span * n:
            continue
        run = np.where(touch, np.where(m.all(axis=0), n_rows, np.argmin(m, axis=0)), 0)  # from the side
        if (run.max() > max_depth * n_rows or np.median(run[touch]) > typical_depth * n_rows
                or run.sum() < min_inside * m.sum()):
            continue
        cols = np.flatnonzero(run >= 4)
        if cols.size < 8:
            continue
        depth = int(run[cols].max())
        fall = a[: depth - 1, cols] - a[1:depth, cols]  # (depth - 1, C): the fall from each px to the next
        fall[np.arange(depth - 1)[:, None] >= run[cols][None, :] - 1] = -np.inf  # beyond the run
        steepest = np.argmax(fall, axis=0)
        if np.mean(steepest < np.maximum(rim + 1, run[cols] / 3.0)) >= min_glow:
            return True
    return False


def _is_flat(g: np.ndarray, comp: np.ndarray, tol: float = 0.05) -> bool:
    """Whether >= 90 % of the component's core lies within ``tol`` of a plane fitted to it (no anatomy).

    The core leaves out the 2-px rim, where the component's own edge blur lies.
    """
    core = _shrink(comp, 2)
    if core.sum() < 20:
        return False
    yy, xx = np.nonzero(core)
    v = g[yy, xx].astype(np.float64)
    step = max(1, v.size // 3000)
    a = np.stack([np.ones(v.size), yy / g.shape[0], xx / g.shape[1]], axis=1)
    coef = least_squares(a[::step], v[::step])
    return bool(np.mean(np.abs(v - a @ coef) <= tol) >= 0.9)


def _joined(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` holding a ``seeds`` pixel (bool, ``mask``'s shape)."""
    lab, n = label(mask)
    touching = np.zeros(n + 1, dtype=bool)
    touching[lab[seeds & mask]] = True
    touching[0] = False
    return touching[lab]


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1)^2 square (a separable max filter: much faster than iterated dilation)."""
    return max_filter(mask.astype(bool, copy=False), 2 * r + 1)


def _shrink(mask: np.ndarray, r: int, border_value: int = 0) -> np.ndarray:
    """Erosion by a (2r+1)^2 square; outside the image counts as ``border_value``."""
    return min_filter(mask.astype(bool, copy=False), 2 * r + 1, cval=border_value)


def _frame(shape: tuple[int, int], width: int = 2) -> np.ndarray:
    """The ``width``-px frame of an image of ``shape`` (bool)."""
    frame = np.zeros(shape, dtype=bool)
    frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
    return frame


def _edge_of(valid: np.ndarray) -> np.ndarray:
    """The frame and the border of the valid region (2 px wide)."""
    return (valid & ~_shrink(valid, 2)) | _frame(valid.shape)


def _opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_opening(mask, structure=_disk(radius))`` (outside the image is background).

    The radius-2 disc (the default at 256 px) is the 5x5 square minus its corners = 3x3 square (+)
    cross, so erosion and dilation become a few shifted logical ops (~5x faster).
    """
    if radius != 2:
        return ndi.binary_opening(mask, structure=_disk(radius))

    def morph(m: np.ndarray, op: Any) -> np.ndarray:
        p = np.pad(m, 2)
        r = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
        sq = op(op(r[:-2], r[1:-1]), r[2:])  # 3x3 square, (h + 2, w + 2)
        c = sq[1:-1, 1:-1]
        return op(op(op(c, sq[:-2, 1:-1]), op(sq[2:, 1:-1], sq[1:-1, :-2])), sq[1:-1, 2:])  # then the cross

    return morph(morph(np.asarray(mask, dtype=bool), np.logical_and), np.logical_or)


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return (xx * xx + yy * yy) <= r * r + r  # a slightly full disc, as skimage's disk for small r


def _upsample(mask: np.ndarray, shape: Sequence[int], factor: float, offset: float) -> np.ndarray:
    """Nearest-neighbour map of a working-copy mask to the input grid ``shape``."""
    if factor == 1.0 and mask.shape == tuple(shape):
        return mask
    rows = np.clip(np.rint((np.arange(shape[0]) - offset) / factor), 0, mask.shape[0] - 1).astype(np.intp)
    cols = np.clip(np.rint((np.arange(shape[1]) - offset) / factor), 0, mask.shape[1] - 1).astype(np.intp)
    return mask.take(rows, axis=0).take(cols, axis=1)


def _hysteresis(g: np.ndarray, low: float, high: float) -> np.ndarray:
    """``skimage.filters.apply_hysteresis_threshold(g, low, high)``: components (4-connected) of
    ``g > low`` holding a pixel ``> high``; selected by indexing instead of per-label sums (~3x faster)."""
    lab, n = label(g > low)
    keep = np.zeros(n + 1, dtype=bool)
    keep[lab[g > high]] = True
    keep[0] = False
    return keep[lab]


def _fill_holes(mask: np.ndarray, contrast: np.ndarray | None = None) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)``: background components (4-connected) not touching the frame
    become foreground; one labelling instead of an iterated dilation.

    With ``contrast`` (``<= 0`` at background level), a hole whose median contrast is at background
    level stays a hole: air enclosed by the body (a hand making a ring, between fixator bars) is not
    body; holes of anatomy that missed the threshold are filled.
    """
    lab, n = label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for border in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        outside[border] = True
    outside[0] = False
    if contrast is not None and n > 1:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        above = np.bincount(lab.ravel(), weights=(contrast > 0).ravel(), minlength=n + 1)
        air = (above < 0.5 * sizes) & (sizes >= 0.0005 * mask.size)
        outside |= air
        outside[0] = False
    return ~outside[lab]


def segment_body_part(
    image: Any,
    work_size: int = 256,
    carrier: bool | CarrierResult | np.ndarray | None = True,
    keep_fraction: float = 0.15,
    opening_radius: int | None = None,
) -> np.ndarray:
    """Body-part mask of a radiograph (soft tissue, bone, casts, implants).

    Args:
        image: (H, W) or (1, H, W) float image in [0, 1], bone bright.
        work_size: long side of the working copy (the mask is computed there and mapped back).
        carrier: ``True`` detects the carrier and treats its exterior as background; a
            :class:`CarrierResult` or an (H, W) bool mask of the valid region is used as given;
            ``False``/``None`` uses the whole image.
        keep_fraction: components of at least this fraction of the largest are kept.
        opening_radius: disc radius (working pixels) of the opening; default scales with
            ``work_size`` (2 px at 256).

    Returns:
        (H, W) bool mask on the input grid.

    Raises:
        ValueError: ``"no body part found: ..."`` for a constant or empty image, when nothing but
            burned-in markers lies above the background (never an empty mask), or a wrong shape.
    """
    arr = plane_2d(image, "segment_body_part")
    arr = finite(arr)
    if arr.size == 0 or float(arr.max() - arr.min()) < 1e-6:
        reason = "the image is constant"
        raise _no_body(reason)
    small, factor, offset = work_copy(arr, work_size)
    valid_small = np.ones(small.shape, dtype=bool)
    if carrier is True:
        carrier = detect_carrier(arr, work_size=work_size)
    if isinstance(carrier, CarrierResult):
        if carrier.found:
            pts = (carrier.polygon - offset) / factor
            valid_small = polygon_mask(small.shape, pts)
    elif isinstance(carrier, np.ndarray):
        valid_small = _downsample_mask(carrier.astype(bool), small.shape, factor, offset)
    if not valid_small.all():  # leave out the carrier border's own blur
        valid_small = _shrink(valid_small, 2, border_value=1)
    if valid_small.sum() < 16:
        valid_small[:] = True
    g = gaussian(small, 1.0)
    radius = max(1, round(2 * max(small.shape) / 256)) if opening_radius is None else int(opening_radius)
    mask = _segment_work(g, valid_small, keep_fraction, radius, raw=_work_max(arr, work_size, small.shape))
    mask = _upsample(mask, arr.shape, factor, offset)
    if not mask.any():  # never an empty mask: the caller would crop and normalise on nothing
        reason = "the body part vanishes on the input grid"
        raise _no_body(reason)
    return mask


def _work_max(image: np.ndarray, work_size: int, shape: tuple[int, int]) -> np.ndarray:
    """Block *maximum* of ``image`` on the grid of :func:`~preprocessing.carrier.work_copy` (same blocks):
    thin burned-in lines keep their full brightness (a block mean would dim them)."""
    return work_copy(image, work_size, reduce="max")[0][: shape[0], : shape[1]]


def _downsample_mask(mask: np.ndarray, shape: Sequence[int], factor: float, offset: float) -> np.ndarray:
    rows = np.clip(np.rint(np.arange(shape[0]) * factor + offset), 0, mask.shape[0] - 1).astype(np.intp)
    cols = np.clip(np.rint(np.arange(shape[1]) * factor + offset), 0, mask.shape[1] - 1).astype(np.intp)
    return mask[rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------ transforms
def _carrier_region(img: Any, shape: Sequence[int]) -> np.ndarray | None:
    """Valid region from a ``carrier_polygon`` (crop coordinates) in ``img.meta``, if any."""
    meta = getattr(img, "meta", None)
    if not meta or not bool(meta.get("carrier_found", False)):
        return None
    poly = meta.get("carrier_polygon")
    if poly is None:
        return None
    poly = np.asarray(convert_data_type(poly, np.ndarray)[0], dtype=np.float64).reshape(-1, 2)
    return polygon_mask(shape, poly)


class SegmentBodyPart(Transform):
    """Body-part mask of a channel-first radiograph ``(1, H, W)`` -> ``(1, H, W)``.

    Returns the mask in the input's array type (numpy, torch, ``MetaTensor`` with the input's meta),
    dtype ``bool`` by default. A ``MetaTensor`` input that went through
    :class:`~preprocessing.carrier.CropToCarrier` carries the carrier polygon: pixels outside it are
    background and the carrier is not searched again; otherwise ``carrier`` applies.

    Args:
        work_size: long side of the working copy.
        carrier: see :func:`segment_body_part` (used when the input has no carrier metadata).
        dtype: output dtype (e.g. ``np.uint8`` / ``torch.float32`` for a float 0/1 mask).
        **kwargs: further :func:`segment_body_part` options (``keep_fraction``, ``opening_radius``).

    Raises:
        ValueError: no body part found, or the input is not ``(1, H, W)``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, work_size: int = 256, carrier: bool = True, dtype: Any = bool, **kwargs: Any) -> None:
        self.work_size = int(work_size)
        self.carrier = carrier
        self.dtype = dtype
        self.kwargs = kwargs

    def __call__(self, img: Any) -> Any:
        """``img (1, H, W)`` -> mask ``(1, H, W)``."""
        arr = single_channel(img, "SegmentBodyPart")
        region = _carrier_region(img, arr.shape)
        carrier = region if region is not None else self.carrier
        if getattr(img, "meta", {}).get("carrier_found") is False and region is None:
            carrier = False  # already searched, none found
        mask = segment_body_part(arr, work_size=self.work_size, carrier=carrier, **self.kwargs)[None]
        dtype = self.dtype
        if isinstance(img, torch.Tensor) and dtype is bool:
            dtype = torch.bool
        out = convert_to_dst_type(mask, img, dtype=dtype)[0]
        return out


class SegmentBodyPartd(MapTransform):
    """Dictionary twin of :class:`SegmentBodyPart`: adds ``mask_key`` ``(1, H, W)`` from ``keys``.

    Optionally multiplies the image by the mask (``apply_mask``) and records the mask's area fraction
    as ``mask_fraction`` in the image's ``MetaTensor`` metadata.

    Args:
        keys: the image key (one key).
        mask_key: key of the output mask (default ``"mask"``).
        apply_mask: multiply the image by the mask.
        allow_missing_keys: skip missing keys.
        **kwargs: :class:`SegmentBodyPart` arguments.
    """

    backend = SegmentBodyPart.backend

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", apply_mask: bool = False,
                 allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.segmenter = SegmentBodyPart(**kwargs)
        self.mask_key = mask_key
        self.apply_mask = apply_mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = self.segmenter(img)
            fraction = float(convert_data_type(mask, np.ndarray)[0].mean())
            if isinstance(img, MetaTensor):
                img.meta["mask_fraction"] = fraction
                if isinstance(mask, MetaTensor):
                    mask.meta = dict(img.meta)
            if self.apply_mask:
                d[key] = img * convert_to_dst_type(mask, img, dtype=img.dtype)[0]
            d[self.mask_key] = mask
        return d


SegmentBodyPartD = SegmentBodyPartDict = SegmentBodyPartd
