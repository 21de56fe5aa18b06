"""Shared pytest fixtures: the real sample data in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SALAD_MED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _shared_subdir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared sample data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_sample() -> Path:
    """../shared/data/dicom_sample (11 real CR/DX files + index.csv)."""
    return _shared_subdir("dicom_sample")


@pytest.fixture(scope="session")
def msk_sample() -> Path:
    """../shared/data/msk_sample (300 FracAtlas JPEGs + labels.csv)."""
    return _shared_subdir("msk_sample")


@pytest.fixture(scope="session")
def cxr_sample() -> Path:
    """../shared/data/cxr_sample (723 NIH 64x64 PNGs + labels.csv)."""
    return _shared_subdir("cxr_sample")
