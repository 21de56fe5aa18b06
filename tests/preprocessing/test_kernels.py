"""The compiled kernels equal, bit for bit, the numpy expressions they replace (written out here as the
reference), on float32 and float64 inputs with NaNs, exact zeros, ties and points beyond the image."""

import numpy as np
import pytest

from preprocessing.kernels import nearest_rise, profiles


def _bilinear_numpy(img, y, x):
    """Reference: the carrier's former numpy sampler, operation for operation."""
    h, w = img.shape
    y = np.clip(y, 0.0, h - 1.0)
    x = np.clip(x, 0.0, w - 1.0)
    y0 = np.minimum(y.astype(np.intp), max(h - 2, 0))
    x0 = np.minimum(x.astype(np.intp), max(w - 2, 0))
    fy, fx = y - y0, x - x0
    i = y0 * w + x0
    flat = img.ravel()
    dy, dx = (w if h > 1 else 0), (1 if w > 1 else 0)
    gx = 1.0 - fx
    top = flat.take(i) * gx
    top += flat[dx:].take(i) * fx
    bottom = flat[dy:].take(i) * gx
    bottom += flat[dy + dx:].take(i) * fx
    top *= 1.0 - fy
    bottom *= fy
    top += bottom
    return top.astype(img.dtype, copy=False)


def _nearest_rise_numpy(z, offsets):
    """Reference: crossings by ``nonzero``, the nearest to offset 0 by ``argmin``."""
    up = (z[..., :-1] < 0) & (z[..., 1:] >= 0)
    at = np.nonzero(up)
    z0, z1 = z[..., :-1][at], z[..., 1:][at]
    cross = np.full(up.shape, np.inf, dtype=np.float64)
    cross[at] = offsets[:-1][at[-1]] + (-z0) / (z1 - z0)
    return np.take_along_axis(cross, np.argmin(np.abs(cross), axis=-1)[..., None], axis=-1)[..., 0]


def bilinear(img, y, x):
    """Samples at ``(y, x)``: one profile of offset 0 per point (the normal does not matter)."""
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    return profiles(img, pts, np.array([[0.6, 0.8]]), np.array([pts.shape[0]]), np.zeros(1))[:, 0]


@pytest.mark.parametrize("shape", [(37, 29), (1, 9), (8, 1)])
def test_bilinear_sampling_equals_scipy_map_coordinates_with_replicated_edges(shape):
    """The carrier's profile sampler gives scipy's order-1 ``mode="nearest"`` values, inside the image,
    between pixels and beyond every edge (degenerate one-row/one-column images too). Tolerance 1e-6: both
    interpolate float32 pixels in float64 and round to float32, only the order of the four products may
    differ (one float32 ulp at values <= 1 is 6e-8)."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(3)
    img = rng.random(shape).astype(np.float32)
    y = np.concatenate([rng.uniform(-4, shape[0] + 3, 500), np.arange(shape[0], dtype=float), [-0.5, shape[0] - 0.5]])
    x = np.concatenate([rng.uniform(-4, shape[1] + 3, 500), np.arange(shape[1], dtype=float)[: shape[0]],
                        np.zeros(max(0, shape[0] - shape[1])), [shape[1] - 0.5, -0.5]])
    got = bilinear(img, y, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ndi.map_coordinates(img, [y, x], order=1, mode="nearest"), rtol=0, atol=1e-6)
    # on the pixel grid the samples are the pixels themselves
    iy, ix = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    np.testing.assert_array_equal(bilinear(img, iy.ravel().astype(float), ix.ravel().astype(float)), img.ravel())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_profiles_equal_the_numpy_expression_bit_for_bit(dtype):
    """Profiles of 13 offsets across three lines (their points partly beyond the image) equal the numpy
    expression: the offset points, then the four-neighbour interpolation."""
    rng = np.random.default_rng(11)
    for shape in ((240, 190), (3, 2), (1, 5), (6, 1)):
        img = rng.random(shape).astype(dtype)
        normals = np.array([[1.0, 0.0], [0.6, -0.8], [-0.28, 0.96]])
        counts = np.array([40, 0, 700])
        pts = np.stack([rng.uniform(-5, shape[1] + 5, 740), rng.uniform(-5, shape[0] + 5, 740)], axis=1)
        offsets = np.arange(-6.0, 7.0)
        got = profiles(img, pts, normals, counts, offsets)
        nrm = np.repeat(normals, counts, axis=0)
        x = pts[:, 0:1] + offsets[None, :] * nrm[:, 0:1]
        y = pts[:, 1:2] + offsets[None, :] * nrm[:, 1:2]
        assert got.dtype == dtype and got.shape == (740, 13)
        np.testing.assert_array_equal(got, _bilinear_numpy(img, y.ravel(), x.ravel()).reshape(740, 13))


def test_profiles_refuse_bad_input_by_name():
    one = np.ones(1, dtype=np.intp)
    with pytest.raises(ValueError, match="profiles: image"):
        profiles(np.zeros((0, 4), np.float32), np.zeros((1, 2)), np.ones((1, 2)), one, np.zeros(3))
    with pytest.raises(ValueError, match="3 points for 1 lines of 1 points"):
        profiles(np.zeros((4, 4), np.float32), np.zeros((3, 2)), np.ones((1, 2)), one, np.zeros(3))


def test_nearest_rise_by_hand():
    """Offsets -2..2: a rise from -1 to 1 between offsets -1 and 0 crosses at -0.5; a second rise at +1.25
    is farther; a profile that only falls has none (inf); a rise to exactly 0 crosses there; two
    crossings equally near (-1.5 and +1.5) keep the first."""
    off = np.arange(-2.0, 3.0)
    z = np.array([[-2.0, -1.0, 1.0, -1.0, 3.0],     # -1 + 1/2 = -0.5; 1 + 1/4 = 1.25
                  [3.0, 2.0, 1.0, 0.5, -1.0],       # falls only
                  [-3.0, -2.0, -0.5, 0.0, 1.0],     # 0 + 0.5 / 0.5 = 1.0: z reaches 0 at offset +1
                  [-1.0, -1.0, 1.0, -1.0, 1.0]])    # -0.5 and 1.5: -0.5
    np.testing.assert_array_equal(nearest_rise(z, off), [-0.5, np.inf, 1.0, -0.5])
    tie = np.array([[-1.0, 1.0, 0.5, -1.0, 1.0]])  # -2 + 1/2 = -1.5 and 1 + 1/2 = 1.5
    np.testing.assert_array_equal(nearest_rise(tie, off), [-1.5])
    near_right = np.array([[-1.0, 1.0, -3.0, 1.0, 2.0]])  # -1.5 and 0 + 3/4 = 0.75
    np.testing.assert_array_equal(nearest_rise(near_right, off), [0.75])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_rise_equals_the_numpy_expression_bit_for_bit(dtype):
    rng = np.random.default_rng(5)
    off = np.arange(13, dtype=np.float64) - 6
    for shape in ((48, 252, 13), (70, 13)):
        z = rng.standard_normal(shape).cumsum(-1).astype(dtype)
        flat = z.reshape(-1, 13)
        flat[:3] = np.nan  # padding rows
        flat[3:40, 5] = 0.0  # exact zeros: a rise "to >= 0"
        flat[40:60] = np.tile(np.array([-1, 1] * 6 + [-1], dtype=dtype), (20, 1))  # many equal crossings
        with np.errstate(invalid="ignore", divide="ignore"):
            want = _nearest_rise_numpy(z, off)
        got = nearest_rise(z, off)
        assert got.shape == shape[:-1] and got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    one = z.reshape(-1, 13)[65]  # a single profile: a 0-d result
    assert nearest_rise(one, off).shape == () and nearest_rise(one, off) == _nearest_rise_numpy(one[None], off)[0]
    with pytest.raises(ValueError, match="nearest_rise: 5 samples per profile, 13 offsets"):
        nearest_rise(np.zeros((2, 5)), off)


def _edge_flags_numpy(sheared, ok, m, d, flank, min_step, flat_tol, ceiling, need):
    """Reference: segmentation's former numpy expressions for the edge samples of ``_edge_runs``."""
    w = ok.shape[2]

    def at(o):
        return sheared[:, :, m + o: m + o + w]

    a1, a3, b1, b3 = at(d + 1), at(d + 3), at(-d - 1), at(-d - 3)
    diff = at(d) - at(-d)
    tol = np.maximum(flat_tol, 0.2 * np.abs(diff))
    flat = ok & (np.abs(a1 - a3) <= tol) & (np.abs(b1 - b3) <= tol)
    kinds = [flat & (diff >= min_step), flat & (diff <= -min_step)]
    ridge = ok & (at(0) - np.minimum(np.maximum(a1, b1), np.maximum(a3, b3)) >= min_step)
    can_run = ridge.sum(axis=1) >= need
    if ceiling is None or not can_run.any():
        ridge[:] = False
    else:
        ridge &= can_run[:, None, :]
        at_ridge = np.flatnonzero(ridge)
        si_ri, xi = np.divmod(at_ridge, w)
        base = si_ri * sheared.shape[2] + m + xi
        span = np.arange(d + 1, flank + 1)
        flat_sh = sheared.ravel()
        right = np.take(flat_sh, base[:, None] + span[None, :]).min(axis=1)
        left = np.take(flat_sh, base[:, None] - span[None, :]).min(axis=1)
        ridge.ravel()[at_ridge] = (right <= ceiling) & (left <= ceiling)
    return np.stack(kinds + [ridge])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_flags_equal_the_numpy_expressions_bit_for_bit(dtype):
    """Sheared lines of a smooth image with steps, thin bright ridges and noise: rising and falling steps
    and ridges (with and without a background ceiling, and with a ridge-run length no line reaches)
    equal the numpy expressions; a ridge is dropped when its flank never comes down to the ceiling."""
    from preprocessing.kernels import edge_flags

    rng = np.random.default_rng(7)
    n_s, n_r, w, m, d = 9, 60, 90, 8, 2
    cols = np.arange(w + 2 * m)
    # ridges on background (20, 21: kept), on a bright field (55), beside a step up (37: its right flank
    # stays bright) and before a step down (66: its left flank stays bright)
    base = 0.2 + 0.3 * (cols >= 40) - 0.25 * (cols >= 70) + 0.5 * np.isin(cols, (20, 21, 37, 55, 66))
    sheared = base[None, None, :] + 0.015 * rng.standard_normal((n_s, n_r, w + 2 * m))
    sheared[3] += 0.3  # one tilt: the ridge's flanks stay above a ceiling of 0.3
    sheared = sheared.astype(dtype)  # (the working copies are float32: numpy computes in it, casting 0.2 etc.)
    sheared[5, :, 20:30], sheared[5, :, 30:40] = 0.0, np.float32(0.06)  # a step of float32(0.06) < 0.06: a
    # rising step in float32 (the threshold cast to it), none in float64
    ok = rng.random((n_s, n_r, w)) < 0.9
    flags = None
    for ceiling, need in ((0.3, 20), (None, 20), (0.3, n_r + 1), (0.6, 5)):
        got = edge_flags(sheared, ok, m, d, 8, 0.06, 0.02, ceiling, need)
        np.testing.assert_array_equal(got, _edge_flags_numpy(sheared, ok, m, d, 8, 0.06, 0.02, ceiling, need))
        if (ceiling, need) == (0.3, 20):
            flags = got
    assert flags[0].any() and flags[1].any() and flags[2].any()  # every kind occurs
    assert flags[0, 5, :, 30 - m - 2: 32 - m].any() == (dtype == np.float32)
    assert not flags[2, 3].any()  # the tilt whose flanks stay above the ceiling holds no ridge
    ridge_cols = set(np.flatnonzero(flags[2].any(axis=(0, 1))) + m)
    assert {20, 21} <= ridge_cols and not {37, 55, 66} & ridge_cols
    with pytest.raises(ValueError, match="edge_flags: lines"):
        edge_flags(sheared[:, :, :-1], ok, m, d, 8, 0.06, 0.02, 0.3, 20)


def _edge_runs_numpy(kinds, ok, inside, centre, need, gap, reach, min_cover, ceiling):
    """Reference: segmentation's former numpy run extraction of ``_edge_runs``."""
    n_s, n_rows, w = ok.shape

    def cumsum0(b):
        c = np.zeros((b.shape[0], b.shape[1] + 1, b.shape[2]), dtype=np.int32)
        np.cumsum(b, axis=1, dtype=np.int32, out=c[:, 1:])
        return c

    def window(c, lo, hi):
        n = c.shape[1] - 1
        lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
        return (np.take_along_axis(c, hi[:, None, :], 1) - np.take_along_axis(c, lo[:, None, :], 1))[:, 0, :]

    res = {k: [] for k in ("first", "last", "length", "head", "tail")}
    for kind, b in enumerate(kinds):
        first, last, length = (np.zeros((n_s, w), dtype=np.intp) for _ in range(3))
        head, tail = np.zeros((n_s, w), dtype=bool), np.zeros((n_s, w), dtype=bool)
        cols = np.flatnonzero((b.sum(axis=1) >= need).any(axis=0))
        if cols.size:
            b = b[:, :, cols]
            cb = cumsum0(b)
            c = cb[:, 1:]
            zero = np.zeros((c.shape[0], gap + 1, c.shape[2]), dtype=np.int32)
            padded = np.concatenate([zero, c, np.repeat(c[:, -1:], gap + 1, axis=1)], axis=1)
            b = b | ((padded[:, 2 * gap + 2:, :] - c > 0) & (c - padded[:, :n_rows, :] - b > 0))
            c = np.cumsum(b, axis=1, dtype=np.int32)
            run = c - np.maximum.accumulate(np.where(b, 0, c), axis=1)
            e = np.argmax(run, axis=1)
            n = np.take_along_axis(run, e[:, None, :], axis=1)[:, 0, :]
            f = e - n + 1
            last[:, cols], first[:, cols] = e, f
            length[:, cols] = np.where(window(cb, f, e + 1) >= min_cover * n, n, 0)
            okc = cumsum0(ok[:, :, cols])
            head[:, cols] = (f < reach) | (window(okc, f - reach, f) < reach)
            tail[:, cols] = (e >= n_rows - reach) | (window(okc, e + 1, e + 1 + reach) < reach)
            if kind == 2 and ceiling is not None:
                dark = cumsum0(inside[:, :, cols] & (centre[:, :, cols] <= ceiling))
                head[:, cols] |= window(dark, np.zeros_like(f), f) == 0
                tail[:, cols] |= window(dark, e + 1, np.full_like(e, n_rows)) == 0
        for key, value in zip(res, (first, last, length, head, tail), strict=True):
            res[key].append(value)
    return tuple(np.stack(res[k]) for k in ("first", "last", "length", "head", "tail"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_runs_equal_the_numpy_run_extraction(dtype):
    """Random edge samples of three kinds (dense lines with gaps, sparse lines, empty ones), the samples'
    validity and a ridge ceiling: first, last, length, head and tail equal the numpy extraction (counting
    only: exact) with and without the ceiling, and a bridged gap makes one run of two pieces."""
    from preprocessing.kernels import edge_runs

    rng = np.random.default_rng(9)
    n_s, n_r, w, m = 5, 80, 40, 6
    dense = rng.random((3, n_s, 1, w)) < 0.5  # lines whose edge shows on most samples
    kinds = (rng.random((3, n_s, n_r, w)) < np.where(dense, 0.85, 0.1)) & (rng.random((3, 1, n_r, w)) < 0.97)
    kinds[:, :, 30:33, :5] = False  # gaps a limb leaves
    ok = rng.random((n_s, n_r, w)) < 0.9
    inside = rng.random((n_s, n_r, w)) < 0.95
    sheared = rng.random((n_s, n_r, w + 2 * m)).astype(dtype)
    sheared[:, :10, m: m + w] = dtype(0.2)  # at the ceiling exactly (compared in the lines' dtype)
    centre = sheared[:, :, m: m + w]
    for ceiling in (0.2, None):
        got = edge_runs(kinds, ok, inside, sheared, m, 16, 5, 4, 0.7, ceiling)
        want = _edge_runs_numpy(kinds, ok, inside, centre, 16, 5, 4, 0.7, ceiling)
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)
    line = np.zeros((1, 1, 40, 1), dtype=bool)
    line[0, 0, 5:15] = line[0, 0, 18:30] = True  # 10 + a gap of 3 + 12 samples
    first, last, length, _, _ = edge_runs(np.repeat(line, 3, 0), np.ones((1, 40, 1), bool), np.ones((1, 40, 1), bool),
                                         np.zeros((1, 40, 1 + 2 * m)), m, 8, 5, 2, 0.7, None)
    assert (int(first[0, 0, 0]), int(last[0, 0, 0]), int(length[0, 0, 0])) == (5, 29, 25)
    with pytest.raises(ValueError, match="edge_runs: edges"):
        edge_runs(kinds, ok[:, :-1], inside, sheared, m, 16, 5, 4, 0.7, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_line_counts_and_medians_equal_the_numpy_expressions(dtype):
    """Tilted lines of an image (segmentation's band search): the valid and bright sample counts, the
    median with invalid samples as -1, and the samples within ``tol`` of it (all, and not bright) equal the
    numpy expressions, with a partly invalid region, on lines crossing the frame."""
    from preprocessing.kernels import line_counts, line_medians
    from preprocessing.segmentation import _line_flat

    rng = np.random.default_rng(13)
    h, w = 120, 90
    g = (0.5 + 0.2 * np.sin(np.arange(w) / 7.0)[None, :] + 0.03 * rng.standard_normal((h, w))).astype(dtype)
    g[:, 40:44] = 0.95  # a bright band
    valid = np.ones((h, w), dtype=bool)
    valid[:20, 60:] = False  # outside the carrier
    bright = g >= dtype(0.6)
    _, flat, inside = _line_flat(h, w)  # (S, W, R)
    cols = np.array([0, 3, 41, 42, 70, 89])
    ok = inside[:, cols] & np.take(valid.ravel(), flat[:, cols])
    v = np.take(g.ravel(), flat[:, cols])
    n_valid, n_lit = line_counts(valid, bright, flat, inside, cols)
    np.testing.assert_array_equal(n_valid, ok.sum(axis=2))
    np.testing.assert_array_equal(n_lit, (ok & np.take(bright.ravel(), flat[:, cols])).sum(axis=2))
    k, tol = flat.shape[2] // 2, 0.04
    med, near, near_dim = line_medians(g, valid, bright, flat, inside, cols, k, tol)
    want = np.partition(np.where(ok, v, -1.0), k, axis=2)[:, :, k]
    assert med.dtype == dtype and want.dtype == dtype
    np.testing.assert_array_equal(med, want)
    close = ok & (np.abs(v - want[:, :, None]) <= tol)
    np.testing.assert_array_equal(near, close.sum(axis=2))
    np.testing.assert_array_equal(near_dim, (close & ~np.take(bright.ravel(), flat[:, cols])).sum(axis=2))
    assert (near[:, 2:4] > 0).all() and (n_lit[:, 2:4] > 0).all()  # the band's lines: bright, uniform
    with pytest.raises(ValueError, match="line_medians: k="):
        line_medians(g, valid, bright, flat, inside, cols, flat.shape[2], tol)


def test_kth_smallest_is_the_partition_value():
    """The medians' selection: every k of arrays with many equal values (invalid samples are all -1), all
    equal, sorted, reversed, of one or two values, float32 and float64: ``np.partition(a, k)[k]``."""
    from preprocessing.kernels import _kth_smallest

    rng = np.random.default_rng(21)
    cases = [rng.random(129), np.round(rng.random(128) * 4) / 4, np.full(50, -1.0), np.arange(64.0),
             np.arange(64.0)[::-1].copy(), np.array([0.5]), np.array([0.7, 0.2]),
             np.where(rng.random(200) < 0.4, -1.0, rng.random(200))]
    for a in cases:
        for dtype in (np.float32, np.float64):
            v = a.astype(dtype)
            for k in range(v.size):
                assert _kth_smallest(v.copy(), k) == np.partition(v, k)[k], (v.size, k)
