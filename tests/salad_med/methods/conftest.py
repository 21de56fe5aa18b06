"""Helpers shared by the method tests: a simulated kill after an epoch, 16-bit tiny splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import write_tiny_split


class Killed(Exception):
    """Stands in for a killed process after an epoch's checkpoint was written."""


def kill_after_epoch(_trainer, _row) -> None:
    """Trainer callback: raise :class:`Killed` after the first epoch's checkpoint."""
    raise Killed


def write_tiny_split_16bit(root: Path, n: int = 32) -> Path:
    """:func:`tests.conftest.write_tiny_split` (preprocessed) with 16-bit PNGs using the whole 16-bit range."""
    csv = write_tiny_split(root, n=n, preprocessed=True)
    for path in pd.read_csv(csv)["output_path"]:
        arr = np.asarray(Image.open(path), dtype=np.float64) / 255.0
        Image.fromarray(np.round(arr * 65535).astype(np.uint16)).save(path)
    assert np.asarray(Image.open(path)).dtype == np.uint16
    return csv
