"""Helpers shared by the method tests: the inline-teacher cache, 16-bit tiny splits (the tiny split, the
image cache and the simulated kill are in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import Killed, kill_after_epoch, write_tiny_split

__all__ = ["Killed", "kill_after_epoch", "write_tiny_split_16bit"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    """One folder of inline SimCLR teachers per test module (pre-trained once, shared by its runs)."""
    return tmp_path_factory.mktemp("teachers")


def write_tiny_split_16bit(root: Path, n: int = 32) -> Path:
    """:func:`tests.conftest.write_tiny_split` (preprocessed) with 16-bit PNGs using the whole 16-bit range."""
    csv = write_tiny_split(root, n=n, preprocessed=True)
    for path in pd.read_csv(csv)["output_path"]:
        arr = np.asarray(Image.open(path), dtype=np.float64) / 255.0
        Image.fromarray(np.round(arr * 65535).astype(np.uint16)).save(path)
    assert np.asarray(Image.open(path)).dtype == np.uint16
    return csv
