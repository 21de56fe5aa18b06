"""OpenCV labelling, min/max filters and Gaussian smoothing give scipy.ndimage's results.

Carrier detection and segmentation took these from scipy; the masks stay the same only if every call
does. Random masks and images of many shapes (1 px wide, smaller than the window, working-copy size),
each function against its scipy twin.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from preprocessing.morphology import gaussian, label, max_filter, min_filter, one_thread

SHAPES = [(1, 1), (1, 17), (13, 1), (3, 4), (7, 9), (31, 47), (240, 192)]


def _masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        for level in (0.0, 0.4, 0.5, 0.6, 1.1):  # empty, blobs, ..., full
            smooth = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 3.0))
            yield smooth > np.quantile(smooth, min(level, 1.0)) if level < 1.0 else np.ones(shape, bool)
        yield np.zeros(shape, bool)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("threads", [1, 4])
def test_label_is_scipy_label_in_raster_order(threads, connectivity):
    """Same labels, numbered the same (callers index ``find_objects`` and per-label sums by them), on one
    thread and on OpenCV's parallel labelling alike."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        for mask in _masks():
            want, n_want = ndi.label(mask, None if connectivity == 4 else np.ones((3, 3)))
            got, n = label(mask, connectivity)
            assert n == n_want
            assert got.dtype == np.int32 and got.shape == mask.shape
            np.testing.assert_array_equal(got, want)
        # a non-bool input: non-zero is foreground
        ints = np.array([[0, 3, 0], [5, 0, 0], [7, 7, 0]])
        np.testing.assert_array_equal(label(ints)[0], ndi.label(ints)[0])
    finally:
        cv2.setNumThreads(before)


@pytest.mark.parametrize("size", [3, 5, 9, (1, 7), (7, 1), (7, 9)])
def test_max_and_min_filters_are_scipy_filters(size):
    rng = np.random.default_rng(1)
    for mask in _masks(2):
        arrays = [mask, mask.view(np.uint8) * np.uint8(200), (rng.random(mask.shape) * 1000).astype(np.int32),
                  rng.random(mask.shape).astype(np.float32), rng.standard_normal(mask.shape)]
        for a in arrays:
            for ours, theirs in ((max_filter, ndi.maximum_filter), (min_filter, ndi.minimum_filter)):
                got = ours(a, size)
                assert got.dtype == a.dtype and got.shape == a.shape
                np.testing.assert_array_equal(got, theirs(a, size=size))  # scipy's reflect mode
                np.testing.assert_array_equal(got, theirs(a, size=size, mode="nearest"))
            for cval in (0, 1):  # the constant mode (segmentation shrinks with the outside as body or not)
                np.testing.assert_array_equal(min_filter(a, size, cval=cval),
                                              ndi.minimum_filter(a, size=size, mode="constant", cval=cval))
                np.testing.assert_array_equal(max_filter(a, size, cval=cval),
                                              ndi.maximum_filter(a, size=size, mode="constant", cval=cval))


def test_empty_arrays_pass_through():
    for shape in ((0, 5), (4, 0)):
        assert label(np.zeros(shape, bool))[1] == 0 and label(np.zeros(shape, bool))[0].shape == shape
        assert max_filter(np.zeros(shape, np.int32), 3).shape == shape
        assert min_filter(np.zeros(shape, bool), 3, cval=1).shape == shape
        assert gaussian(np.zeros(shape, np.float32), 1.0).shape == shape


def test_max_filter_rejects_what_it_cannot_do_exactly():
    with pytest.raises(TypeError, match="unsupported dtype"):
        max_filter(np.full((4, 4), 2**40, dtype=np.int64), 3)


@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 7.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gaussian_is_scipy_gaussian(mode, sigma, dtype):
    """Equal to rounding: the same sampled kernel summed in another order. Tolerance: float32 keeps 24 bits
    (6e-8 relative); a sum of up to ~60 terms of values <= 1 may differ by a few ulp of each term, so 1e-6
    on float32 data in [0, 1] (seen: <= 2e-7) and 1e-12 on float64."""
    rng = np.random.default_rng(3)
    for shape in SHAPES:
        a = rng.random(shape).astype(dtype)
        got = gaussian(a, sigma, mode=mode)
        assert got.dtype == dtype and got.shape == a.shape
        want = ndi.gaussian_filter(a, sigma, mode=mode)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)


def test_one_thread_limits_opencv_and_restores_it():
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        with one_thread():
            assert cv2.getNumThreads() == 1
        assert cv2.getNumThreads() == 3
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
