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
