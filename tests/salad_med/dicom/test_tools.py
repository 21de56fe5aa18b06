"""dcmtk tool lookup: pynetdicom's same-named venv scripts must never be taken for dcmtk's."""

from __future__ import annotations

import os
import stat

import pytest

from salad_med.dicom import tools as dicom_tools
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool


@pytest.fixture(autouse=True)
def _fresh_cache():
    dicom_tools.dcmtk_tool.cache_clear()
    dicom_tools.is_dcmtk.cache_clear()
    yield
    dicom_tools.dcmtk_tool.cache_clear()
    dicom_tools.is_dcmtk.cache_clear()


def _script(folder, name, banner):
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_lookalike_first_on_path_is_skipped(tmp_path, monkeypatch):
    venv_bin, system_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    venv_bin.mkdir(parents=True)
    system_bin.mkdir(parents=True)
    fake = _script(venv_bin, "storescu", "usage: storescu [-h] [--version] addr port path (pynetdicom 3.0)")
    real = _script(system_bin, "storescu", "$dcmtk: storescu v3.6.7 2022-04-22 $")
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_bin), str(system_bin)]))
    assert dcmtk_tool("storescu") == str(real)
    dicom_tools.dcmtk_tool.cache_clear()
    monkeypatch.setenv("PATH", str(venv_bin))
    assert dcmtk_tool("storescu") is None
    reason = dcmtk_missing_reason("storescu")
    assert str(fake) in reason and "non-dcmtk" in reason and "apt-get install dcmtk" in reason


def test_absent_tool_says_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert dcmtk_tool("echoscu") is None
    assert dcmtk_missing_reason("echoscu") == "dcmtk's echoscu is not installed (apt-get install dcmtk)"
