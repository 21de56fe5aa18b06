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


# ------------------------------------------------------------------ tiny training runs (trainer engineer)
#: ``--set`` overrides of configs/demo.yaml for seconds-long CPU runs on 32x32 images.
TINY_OVERRIDES = [
    "data.dataset=nih", "data.image_size=32", "preprocess.size=32", "model.base_channels=4",
    "model.latent_dim=16", "train.batch_size=8", "train.pretrain_epochs=1", "train.rounds=1",
    "train.epochs_per_round=1", "train.k=4", "score.k=4", "train.lr=0.002",
    # the CPU path on every machine (train.device=auto would train on a GPU where one exists, and GPU-trained
    # weights scored on the CPU differ by TF32 / cuDNN rounding): tests/salad_med/engine/test_gpu.py covers CUDA
    "train.device=cpu",
]


def python_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a ``python -m ...`` subprocess that must import this checkout: the
    repository first on ``PYTHONPATH`` (the caller's entries kept after it), then ``overrides``."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT), **overrides}


def write_tiny_split(root: Path, n: int = 48, size: int = 32, seed: int = 0, preprocessed: bool = False) -> Path:
    """Write ``n`` tiny radiograph-like PNGs (a bright blob; abnormal ones carry a bright square) and a
    split manifest ``root/split.csv`` (half train with one known anomaly, a quarter val, a quarter test).

    Args:
        preprocessed: also fill ``output_path`` (the trainer then reads the PNGs without the pipeline).
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        split = "train" if i < n // 2 else ("val" if i < 3 * n // 4 else "test")
        label = int(i == 0) if split == "train" else i % 2
        cx, cy = 0.5 + 0.08 * rng.standard_normal(2)
        img = 0.75 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.06) + 0.05 * rng.random((size, size))
        if label:
            px, py = rng.uniform(0.35, 0.65, 2)
            img += 0.6 * ((np.abs(xx - px) < 0.08) & (np.abs(yy - py) < 0.08))
        path = root / f"img{i:03d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        rows.append({"image_id": f"img{i:03d}", "source_path": str(path),
                     "output_path": str(path) if preprocessed else "", "patient_id": f"p{i:03d}",
                     "body_part": "XR_HAND" if i % 4 < 2 else "XR_WRIST", "study": "study1", "label": label,
                     "split": split, "group_id": f"p{i:03d}", "known_anomaly": split == "train" and label == 1})
    out = root / "split.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A preprocessed tiny split (32 images), one per test module: the module's runs share it."""
    return write_tiny_split(tmp_path_factory.mktemp("split"), n=32, preprocessed=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One image-cache folder per test module."""
    return tmp_path_factory.mktemp("cache")


class Killed(Exception):
    """Stands in for a killed process after an epoch's checkpoint was written."""


def kill_after_epoch(_trainer, _row) -> None:
    """Trainer callback: raise :class:`Killed` after the first epoch's checkpoint."""
    raise Killed


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> Path:
    """A 48-image split manifest of 32x32 PNGs (see :func:`write_tiny_split`)."""
    return write_tiny_split(tmp_path_factory.mktemp("tiny_split"))


@pytest.fixture(scope="session")
def tiny_run(tiny_split, tmp_path_factory) -> Path:
    """A SALAD run directory trained for 2 epochs on :func:`tiny_split` (best.pt, last.pt, config.yaml...)."""
    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = load_config("demo", TINY_OVERRIDES)
    train_from_manifest(cfg, tiny_split, run_dir)
    return run_dir


# ------------------------------------------------------------------ tiny DICOM run (radiology integration)
@pytest.fixture(scope="session")
def tiny_dicom_run(tmp_path_factory):
    """A SALAD run (conv6, 32x32) trained for 6 epochs on 24 DICOM phantoms (96x96; CR/DX, MONOCHROME1/2,
    8/12/16 bits, explicit/implicit little endian and RLE; 16 train, 8 val of which 2 abnormal), with a
    non-degenerate score spread.

    Returns:
        ``SimpleNamespace(run_dir, dicom_dir, files)``; ``files`` is the ``write_dicom_tree`` table
        (``source_path``, ``sop_instance_uid``, ``transfer_syntax``, ...).
    """
    from types import SimpleNamespace

    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.synthetic.phantom import write_dicom_tree

    root = tmp_path_factory.mktemp("tiny_dicom_run")
    files = write_dicom_tree(root / "dicom", n=24, seed=1, size=(96, 96))
    split = files[["image_id", "source_path", "patient_id", "body_part", "study", "label"]].copy()
    # val = rows 12-19 (2 abnormal, 6 normal): model selection needs both classes
    split["split"] = ["train"] * 12 + ["val"] * 8 + ["train"] * 4
    split["group_id"] = split["patient_id"]
    split["known_anomaly"] = False
    split.to_csv(root / "split.csv", index=False)
    cfg = load_config("demo", [*TINY_OVERRIDES, "data.dataset=dicom", "preprocess.detect_carrier=false",
                               "preprocess.segment=false", "train.lr=0.01", "train.pretrain_epochs=4",
                               "train.epochs_per_round=2"])
    train_from_manifest(cfg, root / "split.csv", root / "run")
    return SimpleNamespace(run_dir=root / "run", dicom_dir=root / "dicom", files=files)
