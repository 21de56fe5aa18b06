"""Atomic writes: nothing half-written, old content kept on failure, usual file mode."""

from __future__ import annotations

import os
import stat

import pytest

from preprocessing.atomic import atomic_path, atomic_write_text


def test_write_and_mode(tmp_path):
    out = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert out.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["a.txt"]


def test_failure_keeps_previous_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".csv" and tmp.parent == tmp_path
        tmp.write_text("half")
        msg = "crash"
        raise RuntimeError(msg)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_png_round_trips_exactly_and_run_length_strategy_is_smaller():
    """Written PNGs decode to the same array (8 and 16 bit); the run-length zlib strategy (the default) writes a
    smooth radiograph-like image smaller than zlib's default strategy at the same level."""
    import io

    import numpy as np
    from PIL import Image

    from preprocessing.atomic import encode_png

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :200]
    smooth = 0.5 + 0.3 * np.sin(xx / 40.0) * np.cos(yy / 55.0) + 0.01 * rng.standard_normal((256, 200))
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        arr = np.rint(np.clip(smooth, 0, 1) * top).astype(dtype)
        data = encode_png(arr)
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert back.dtype == dtype and np.array_equal(back, arr)
        if dtype == np.uint8:
            assert len(data) < len(encode_png(arr, compress_type=None))


def test_mask_png_without_row_filter_round_trips_and_is_no_larger():
    """Masks are written with PNG's row filter "none" (what ``preprocess`` does): a 0/255 mask (and a 16-bit
    array) decodes to the same array with Pillow, the file no larger than with adaptive filtering, and an
    unknown filter or a bad array is refused by name."""
    import io

    import numpy as np
    import pytest
    from PIL import Image

    from preprocessing.atomic import encode_png

    yy, xx = np.mgrid[:512, :512]
    mask = np.where((yy - 256) ** 2 / 200**2 + (xx - 230) ** 2 / 120**2 < 1, 255, 0).astype(np.uint8)
    mask[40:60, 400:430] = 255  # a second component
    data = encode_png(mask, row_filter="none")
    back = Image.open(io.BytesIO(data))
    assert back.mode == "L" and np.array_equal(np.asarray(back), mask)
    assert len(data) <= len(encode_png(mask))
    wide = (np.arange(300 * 7).reshape(300, 7) * 31).astype(np.uint16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(wide, row_filter="none")))), wide)
    with pytest.raises(ValueError, match="row_filter"):
        encode_png(mask, row_filter="paeth")
    with pytest.raises(ValueError, match="m.png: need a 2-D"):
        encode_png(mask[None], name="m.png", row_filter="none")
