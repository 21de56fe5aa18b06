"""Compiled inner loops of carrier detection and segmentation (numba).

Each kernel computes *the same floating-point operations, in the same dtype and order,* as the numpy
expression it replaces (quoted in its docstring), one element at a time instead of one array operation at
a time: no reassociation, no fused multiply-add (numba compiles without ``fastmath``), thresholds cast to
the data's dtype as numpy casts a Python float meeting a float32 array; selections and counts have one
answer whatever the order. So the results are equal bit for bit, which
``tests/preprocessing/test_kernels.py`` checks against those numpy expressions, on float32 and float64. What they
save is numpy's per-operation cost on the many small, short-axis arrays of the working copies (a
profile of 13 samples, a line of 128): measured on the 36 full-resolution FracAtlas JPEGs, see
``python -m benchmarks preprocess``.

Compiled on first use and cached beside this file (``cache=True``; where that folder is read-only,
numba's user-wide cache); ``nogil``: a thread running one does not hold up the others.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["edge_flags", "edge_runs", "line_counts", "line_medians", "nearest_rise", "profiles"]


@njit(cache=True, nogil=True)
def _nearest_rise(z: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    n, k = z.shape
    for i in range(n):
        best = np.inf
        dist = np.inf
        for j in range(k - 1):
            z0 = z[i, j]
            z1 = z[i, j + 1]
            if z0 < 0 and z1 >= 0:
                c = offsets[j] + (-z0) / (z1 - z0)
                a = abs(c)
                if a < dist:  # strictly nearer: ties keep the first (argmin's choice)
                    dist = a
                    best = c
        out[i] = best


def nearest_rise(z: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per profile of ``z (..., K)`` (sampled at ``offsets (K,)``, float64) the sub-pixel offset where it
    rises through 0 (from ``< 0`` to ``>= 0``, linear interpolation), the crossing nearest offset 0;
    ``inf`` without one (NaN samples never cross). Float64.

    The numpy expression: ``cross = offsets[:-1] + (-z0) / (z1 - z0)`` at the crossings (``z0, z1``: the
    samples on either side, in ``z``'s dtype; ``inf`` elsewhere), then the one of least ``abs`` (the
    first of equals).
    """
    z = np.asarray(z)
    offsets = np.ascontiguousarray(offsets, dtype=np.float64)
    if z.shape[-1] != offsets.shape[0]:
        msg = f"nearest_rise: {z.shape[-1]} samples per profile, {offsets.shape[0]} offsets"
        raise ValueError(msg)
    flat = np.ascontiguousarray(z.reshape(-1, z.shape[-1]))
    out = np.empty(flat.shape[0], dtype=np.float64)
    if flat.size:
        _nearest_rise(flat, offsets, out)
    return out.reshape(z.shape[:-1])


@njit(cache=True, nogil=True, inline="always")
def _bilinear_at(flat: np.ndarray, h: int, w: int, y: float, x: float) -> float:  # pragma: no cover - compiled
    dy = w if h > 1 else 0
    dx = 1 if w > 1 else 0
    yy = min(max(y, 0.0), h - 1.0)  # np.clip
    xx = min(max(x, 0.0), w - 1.0)
    y0 = min(int(yy), max(h - 2, 0))  # yy >= 0: truncation is floor
    x0 = min(int(xx), max(w - 2, 0))
    fy = yy - y0
    fx = xx - x0
    i = y0 * w + x0
    gx = 1.0 - fx
    top = flat[i] * gx  # the image's dtype times float64 weights: float64
    top = top + flat[i + dx] * fx
    bottom = flat[i + dy] * gx
    bottom = bottom + flat[i + dy + dx] * fx
    top = top * (1.0 - fy)
    bottom = bottom * fy
    return top + bottom


@njit(cache=True, nogil=True)
def _profiles(flat: np.ndarray, h: int, w: int, pts: np.ndarray, normals: np.ndarray, counts: np.ndarray,
              offsets: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    p = 0
    for line in range(counts.shape[0]):
        nx, ny = normals[line, 0], normals[line, 1]
        for _ in range(counts[line]):
            for j in range(offsets.shape[0]):
                out[p, j] = _bilinear_at(flat, h, w, pts[p, 1] + offsets[j] * ny, pts[p, 0] + offsets[j] * nx)
            p += 1


def profiles(img: np.ndarray, pts: np.ndarray, normals: np.ndarray, counts: np.ndarray,
             offsets: np.ndarray) -> np.ndarray:
    """Bilinear profiles across lines: ``(P, K)`` samples of ``img (h, w)`` (its dtype) at ``pts[p] + offsets[k]
    * n`` with ``n`` the unit normal of the point's line (``normals (L, 2)`` as ``(x, y)``; line ``l`` owns the
    next ``counts[l]`` of the ``pts (P, 2)``, float64), edges replicated beyond the image: the values of
    ``scipy.ndimage.map_coordinates(img, [y, x], order=1, mode="nearest")`` (to float rounding).

    The numpy expression: ``x = pts[:, 0:1] + offsets * n_x``, ``y = pts[:, 1:2] + offsets * n_y``, clipped
    to the image, ``y0, x0`` their integer parts (at most ``h - 2``, ``w - 2``), ``fy, fx`` the fractions,
    and ``(a (1 - fx) + b fx) (1 - fy) + (c (1 - fx) + d fx) fy`` in float64 with ``a .. d`` the four
    neighbours, cast to ``img``'s dtype.
    """
    img = np.ascontiguousarray(img)
    pts = np.ascontiguousarray(pts, dtype=np.float64).reshape(-1, 2)
    normals = np.ascontiguousarray(normals, dtype=np.float64).reshape(-1, 2)
    counts = np.ascontiguousarray(counts, dtype=np.intp).ravel()
    offsets = np.ascontiguousarray(offsets, dtype=np.float64).ravel()
    if img.ndim != 2 or img.size == 0 or counts.shape[0] != normals.shape[0] or int(counts.sum()) != pts.shape[0]:
        msg = (f"profiles: image {img.shape}, {pts.shape[0]} points for {normals.shape[0]} lines of "
               f"{int(counts.sum())} points")
        raise ValueError(msg)
    out = np.empty((pts.shape[0], offsets.shape[0]), dtype=np.float64)
    _profiles(img.ravel(), img.shape[0], img.shape[1], pts, normals, counts, offsets, out)
    return out.astype(img.dtype, copy=False)


@njit(cache=True, nogil=True)
def _edge_flags(sheared: np.ndarray, ok: np.ndarray, m: int, d: int, flank: int, min_step: float, flat_tol: float,
                factor: float, ceiling: float, need: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    # (every offset is a slice of the row, indexed from 0: numba then needs no negative-index check per
    # access and the loops vectorise; the float arguments come in the lines' dtype, as numpy casts a
    # Python float meeting an array)
    n_s, n_r, w = ok.shape
    span = flank - d  # offsets d + 1 .. flank on either side
    count = np.zeros((n_s, w), dtype=np.int64)
    least = np.empty(sheared.shape[2] - span + 1, dtype=sheared.dtype)
    for s in range(n_s):
        cnt = count[s]
        for r in range(n_r):
            row, okr, rising, falling, ridge = sheared[s, r], ok[s, r], out[0, s, r], out[1, s, r], out[2, s, r]
            centre, ad, bd = row[m: m + w], row[m + d: m + d + w], row[m - d: m - d + w]
            a1, a3 = row[m + d + 1: m + d + 1 + w], row[m + d + 3: m + d + 3 + w]
            b1, b3 = row[m - d - 1: m - d - 1 + w], row[m - d - 3: m - d - 3 + w]
            for x in range(w):
                diff = ad[x] - bd[x]
                t = factor * abs(diff)
                tol = flat_tol if flat_tol > t else t  # np.maximum
                flat = okr[x] & (abs(a1[x] - a3[x]) <= tol) & (abs(b1[x] - b3[x]) <= tol)
                rising[x] = flat & (diff >= min_step)
                falling[x] = flat & (diff <= -min_step)
                near = a1[x] if a1[x] > b1[x] else b1[x]
                far = a3[x] if a3[x] > b3[x] else b3[x]
                ridge[x] = okr[x] & (centre[x] - (near if near < far else far) >= min_step)
                cnt[x] += ridge[x]
    if not ceiling == ceiling:  # NaN ceiling: no ridges
        out[2] = False
        return
    for s in range(n_s):
        cnt = count[s]
        for r in range(n_r):
            ridge = out[2, s, r]
            keep = False
            for x in range(w):
                ridge[x] = ridge[x] & (cnt[x] >= need)
                keep |= ridge[x]
            if not keep:
                continue
            row = sheared[s, r]
            for i in range(least.shape[0]):  # least[i]: the least of row[i : i + span]
                seg = row[i: i + span]
                v = seg[0]
                for j in range(1, span):
                    v = seg[j] if seg[j] < v else v
                least[i] = v
            right, left = least[m + d + 1: m + d + 1 + w], least[m - flank: m - flank + w]
            for x in range(w):
                ridge[x] = ridge[x] & (right[x] <= ceiling) & (left[x] <= ceiling)


def edge_flags(sheared: np.ndarray, ok: np.ndarray, m: int, d: int, flank: int, min_step: float, flat_tol: float,
               ceiling: float | None, need: int) -> np.ndarray:
    """The edge samples of :func:`~preprocessing.segmentation._edge_runs`: ``(3, S, R, W)`` bool (rising step,
    falling step, ridge) of the sheared lines ``sheared (S, R, W + 2 m)`` at the samples ``ok``, computed in
    ``sheared``'s dtype (float32 or float64; the thresholds cast to it, as numpy does with a Python float).

    With ``at(o) = sheared[:, :, m + o : m + o + W]``, the numpy expressions: ``diff = at(d) - at(-d)``,
    ``tol = np.maximum(flat_tol, 0.2 * abs(diff))``, flat where ``|at(d + 1) - at(d + 3)| <= tol`` and
    ``|at(-d - 1) - at(-d - 3)| <= tol``; a rising (falling) step: flat and ``diff >= min_step``
    (``<= -min_step``); a ridge: ``at(0) - min(max(at(d + 1), at(-d - 1)), max(at(d + 3), at(-d - 3))) >=
    min_step`` on a line with ``>= need`` ridge samples, whose least sample at offsets ``d + 1 .. flank``
    on either side is ``<= ceiling`` (no ridges when ``ceiling`` is None). ``m >= flank >= d + 3``.
    """
    sheared = np.ascontiguousarray(sheared)
    ok = np.ascontiguousarray(ok, dtype=np.bool_)
    n_s, n_r, w = ok.shape
    if sheared.dtype not in (np.float32, np.float64) or sheared.shape != (n_s, n_r, w + 2 * m) \
            or not m >= flank >= d + 3:
        msg = f"edge_flags: lines {sheared.dtype} {sheared.shape} for samples {ok.shape} with m={m}, flank={flank}, d={d}"
        raise ValueError(msg)
    out = np.zeros((3, n_s, n_r, w), dtype=np.bool_)
    real = sheared.dtype.type
    _edge_flags(sheared, ok, int(m), int(d), int(flank), real(min_step), real(flat_tol), real(0.2),
                real(np.nan if ceiling is None else ceiling), int(need), out)
    return out


@njit(cache=True, nogil=True)
def _edge_runs(kinds: np.ndarray, ok: np.ndarray, inside: np.ndarray, sheared: np.ndarray, m: int, need: int,
               gap: int, reach: int, min_cover: float, ceiling: float, first: np.ndarray, last: np.ndarray,
               length: np.ndarray, head: np.ndarray, tail: np.ndarray) -> None:  # pragma: no cover - compiled
    n_k, n_s, n_r, w = kinds.shape
    c = np.zeros(n_r + 1, dtype=np.int64)  # c[i]: edge samples before i (cumulative, leading 0)
    okc = np.zeros(n_r + 1, dtype=np.int64)
    dark = np.zeros(n_r + 1, dtype=np.int64)
    for k in range(n_k):
        for x in range(w):
            can = False  # a line is looked at when one of its tilts holds >= need edge samples
            for s in range(n_s):
                cnt = 0
                for r in range(n_r):
                    cnt += kinds[k, s, r, x]
                can |= cnt >= need
            if not can:
                continue
            for s in range(n_s):
                for r in range(n_r):
                    c[r + 1] = c[r] + kinds[k, s, r, x]
                    okc[r + 1] = okc[r] + ok[s, r, x]
                # the longest run of edge samples, gaps of <= gap bridged where the edge lies within gap + 1
                # samples on both sides; the first of the longest
                run, best, e = 0, 0, 0
                for r in range(n_r):
                    on = kinds[k, s, r, x]
                    if not on:
                        ahead = c[min(r + gap + 1, n_r - 1) + 1] - c[r + 1]  # edge samples in (r, r + gap + 1]
                        behind = c[r] - c[max(r - gap, 0)]  # in [r - gap, r - 1]
                        on = ahead > 0 and behind > 0
                    run = run + 1 if on else 0
                    if run > best:
                        best, e = run, r
                f = e - best + 1
                first[k, s, x], last[k, s, x] = f, e
                length[k, s, x] = best if c[e + 1] - c[f] >= min_cover * best else 0
                # the frame or the valid region's border within reach beyond the run's ends
                head[k, s, x] = f < reach or okc[f] - okc[max(f - reach, 0)] < reach
                tail[k, s, x] = e >= n_r - reach or okc[min(e + 1 + reach, n_r)] - okc[e + 1] < reach
                if k == 2 and ceiling == ceiling:  # a ridge: also no background from its ends to the frame
                    for r in range(n_r):
                        dark[r + 1] = dark[r] + (inside[s, r, x] and sheared[s, r, m + x] <= ceiling)
                    head[k, s, x] |= dark[f] == 0
                    tail[k, s, x] |= dark[n_r] - dark[e + 1] == 0


def edge_runs(kinds: np.ndarray, ok: np.ndarray, inside: np.ndarray, sheared: np.ndarray, m: int, need: int,
              gap: int, reach: int, min_cover: float, ceiling: float | None) -> tuple[np.ndarray, ...]:
    """The runs of :func:`~preprocessing.segmentation._edge_runs`: per kind, tilt and line of ``kinds (K, S, R,
    W)`` (:func:`edge_flags`) ``(first, last, length, head, tail)``, ``(K, S, W)`` each (intp, intp, intp,
    bool, bool), all 0 / False on a line none of whose tilts holds ``>= need`` edge samples.

    Per tilted line: the longest run (the first of equals) of samples showing the edge, a sample without
    it counting when the edge shows within ``gap + 1`` samples both before and after it; ``length`` is the
    run's length when ``>= min_cover`` of it shows the edge, else 0; ``head`` (``tail``): fewer than ``reach``
    of the ``reach`` samples before ``first`` (after ``last``) are ``ok``, or the run ends within ``reach`` of
    the line's end; for kind 2 (ridges) with a ``ceiling`` also: no ``inside`` sample of ``centre = sheared[...,
    m : m + W]`` at or below it (in ``sheared``'s float dtype) before ``first`` (after ``last``). Counting only:
    integers, exact.
    """
    kinds = np.ascontiguousarray(kinds, dtype=np.bool_)
    n_k, n_s, n_r, w = kinds.shape
    if ok.shape != (n_s, n_r, w) or inside.shape != (n_s, n_r, w) or sheared.shape[:2] != (n_s, n_r) \
            or sheared.shape[2] < m + w or sheared.dtype not in (np.float32, np.float64):
        msg = f"edge_runs: edges {kinds.shape}, samples {ok.shape} / {inside.shape}, lines {sheared.shape}"
        raise ValueError(msg)
    first, last, length = (np.zeros((n_k, n_s, w), dtype=np.intp) for _ in range(3))
    head, tail = np.zeros((n_k, n_s, w), dtype=np.bool_), np.zeros((n_k, n_s, w), dtype=np.bool_)
    sheared = np.ascontiguousarray(sheared)
    real = sheared.dtype.type  # (the ceiling compared in the lines' dtype, as numpy does with a Python float)
    _edge_runs(kinds, np.ascontiguousarray(ok, dtype=np.bool_), np.ascontiguousarray(inside, dtype=np.bool_),
               sheared, int(m), int(need), int(gap), int(reach), float(min_cover),
               real(np.nan if ceiling is None else ceiling), first, last, length, head, tail)
    return first, last, length, head, tail


@njit(cache=True, nogil=True)
def _line_counts(code: np.ndarray, flat: np.ndarray, inside: np.ndarray, cols: np.ndarray, n_valid: np.ndarray,
                 n_lit: np.ndarray) -> None:  # pragma: no cover - compiled
    n_s, n_r = flat.shape[0], flat.shape[2]
    for s in range(n_s):
        for j in range(cols.shape[0]):
            f, ins = flat[s, cols[j]], inside[s, cols[j]]
            a = 0
            b = 0
            for r in range(n_r):  # (branch-free: bit 0 of code valid, bit 1 valid and bright; ins 0 or 1)
                c = code[f[r]]
                a += c & ins[r]
                b += (c >> 1) & ins[r]
            n_valid[s, j] = a
            n_lit[s, j] = b


def line_counts(valid: np.ndarray, bright: np.ndarray, flat: np.ndarray, inside: np.ndarray,
                cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tilted line ``flat[s, c]`` (flat indices into an image, ``(S, W, R)``; ``inside``: its samples in
    the frame) of the columns ``cols``: the valid samples (``inside`` and ``valid``) and of those the
    ``bright`` ones, ``(S, len(cols))`` intp each (``valid``, ``bright``: bool masks of the image)."""
    cols = np.ascontiguousarray(cols, dtype=np.intp)
    valid = np.asarray(valid, dtype=np.bool_)
    code = (valid.view(np.uint8) | ((valid & bright).view(np.uint8) << 1)).ravel()
    n_valid = np.zeros((flat.shape[0], cols.size), dtype=np.intp)
    n_lit = np.zeros((flat.shape[0], cols.size), dtype=np.intp)
    _line_counts(code, flat, np.ascontiguousarray(inside, dtype=np.bool_).view(np.uint8), cols, n_valid, n_lit)
    return n_valid, n_lit


@njit(cache=True, nogil=True)
def _kth_smallest(buf: np.ndarray, k: int) -> float:  # pragma: no cover - compiled
    """The ``k``-th smallest value of ``buf`` (reordered in place): quickselect, median-of-three pivots and
    Hoare partitioning (runs of equal values split evenly). The value ``np.partition(buf, k)[k]``; a
    hand-written selection because numba's own ``np.partition`` takes seconds to compile."""
    lo, hi = 0, buf.shape[0] - 1
    while lo < hi:
        a, b, c = buf[lo], buf[(lo + hi) // 2], buf[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break  # buf[j + 1 .. i - 1] all equal the pivot
    return buf[k]


@njit(cache=True, nogil=True)
def _line_medians(g: np.ndarray, valid: np.ndarray, bright: np.ndarray, flat: np.ndarray, inside: np.ndarray,
                  cols: np.ndarray, k: int, tol: float, med: np.ndarray, near: np.ndarray,
                  near_dim: np.ndarray) -> None:  # pragma: no cover - compiled
    n_s, n_r = flat.shape[0], flat.shape[2]
    buf = np.empty(n_r, dtype=g.dtype)
    for s in range(n_s):
        for j in range(cols.shape[0]):
            f, ins = flat[s, cols[j]], inside[s, cols[j]]
            for r in range(n_r):
                buf[r] = g[f[r]] if ins[r] and valid[f[r]] else -1.0
            m = _kth_smallest(buf, k)
            a = 0
            b = 0
            for r in range(n_r):
                i = f[r]
                if ins[r] and valid[i] and abs(g[i] - m) <= tol:
                    a += 1
                    b += not bright[i]
            med[s, j] = m
            near[s, j] = a
            near_dim[s, j] = b


def line_medians(g: np.ndarray, valid: np.ndarray, bright: np.ndarray, flat: np.ndarray, inside: np.ndarray,
                 cols: np.ndarray, k: int, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tilted line of :func:`line_counts`: the ``k``-th smallest sample (invalid samples counted as
    -1: they sort first), in ``g``'s dtype, and the valid samples within ``tol`` of it (``tol`` in ``g``'s
    dtype, as numpy compares an array with a Python float), all of them and those not ``bright``,
    ``(S, len(cols))`` each. The numpy expression: ``np.partition(np.where(ok, v, -1.0), k, axis=-1)[..., k]``
    and ``count(ok & (abs(v - med) <= tol))``."""
    g = np.ascontiguousarray(g)
    cols = np.ascontiguousarray(cols, dtype=np.intp)
    shape = (flat.shape[0], cols.size)
    med = np.zeros(shape, dtype=g.dtype)
    near, near_dim = np.zeros(shape, dtype=np.intp), np.zeros(shape, dtype=np.intp)
    if not 0 <= k < flat.shape[2]:
        msg = f"line_medians: k={k} outside the {flat.shape[2]} samples of a line"
        raise ValueError(msg)
    _line_medians(g.ravel(), np.ascontiguousarray(valid, dtype=np.bool_).ravel(),
                  np.ascontiguousarray(bright, dtype=np.bool_).ravel(), flat, inside, cols, int(k),
                  g.dtype.type(tol), med, near, near_dim)
    return med, near, near_dim
