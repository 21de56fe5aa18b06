"""Builders and checks of the fault corpus (:mod:`tests.salad_med.test_fault_corpus`).

Every bad input is written from code here (no binary is committed): radiograph-like PNGs, broken
PNG/JPEG/text files, DICOM phantoms carrying a known fake patient name (:data:`FAKE_PATIENT_NAME`) and
broken DICOM objects. The checks are the ones every fault case makes: one ``error:`` line naming the
file or key and the reason, no temporary file left behind, outputs that parse, no patient name in any
log, CSV or audit file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

#: PatientName of every DICOM the corpus writes: it must never reach a log, CSV or audit file.
FAKE_PATIENT_NAME = "Faultcorpus^Secretname"
PHI_MARKERS = tuple(FAKE_PATIENT_NAME.split("^"))
#: Files read as text by :func:`phi_hits` (DICOM SRs carry the patient by design and are not searched).
TEXT_SUFFIXES = (".csv", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".log")


# ------------------------------------------------------------------------------------------ inputs
def radiograph_png(path: str | os.PathLike, seed: int = 0, size: int = 48) -> Path:
    """A radiograph-like grey PNG: a bright blob on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + 0.05 * rng.standard_normal(2)
    img = 0.75 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.06) + 0.05 * rng.random((size, size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def phantom_dicom(path: str | os.PathLike, seed: int = 0, size: int = 64, **tags) -> Path:
    """A 12-bit CR phantom (:func:`salad_med.synthetic.phantom.write_dicom`) named :data:`FAKE_PATIENT_NAME`."""
    from salad_med.synthetic.phantom import PhantomSpec, make_phantom, write_dicom

    spec = PhantomSpec(height=size, width=size, body_part="XR_FOREARM", carrier=None, markers=False, bits_stored=12)
    return write_dicom(make_phantom(spec, seed=seed), path, patient_id=f"fc{seed:04d}",
                       PatientName=FAKE_PATIENT_NAME, **tags)


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


def write_bad_images(folder: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """One file per bad image kind: ``kind -> (path, fragment the reason must contain)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(1).random((48, 48)) * 255).astype(np.uint8)
    png, jpeg = _encoded(arr, "PNG"), _encoded(arr, "JPEG")
    out = {
        "zero-byte file": (folder / "zero.png", "empty file"),
        "truncated PNG": (folder / "cut_png.png", "truncated PNG"),
        "truncated JPEG": (folder / "cut_jpeg.jpg", "truncated JPEG"),
        "text named .png": (folder / "notes.png", "contains text"),
        "constant image": (folder / "flat.png", "constant"),
        "1x1 image": (folder / "dot.png", "1x1"),
    }
    out["zero-byte file"][0].write_bytes(b"")
    out["truncated PNG"][0].write_bytes(png[: len(png) // 2])
    out["truncated JPEG"][0].write_bytes(jpeg[: len(jpeg) // 2])
    out["text named .png"][0].write_text("patient list, not an image\n")
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(out["constant image"][0])
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(out["1x1 image"][0])
    return out


def write_bad_dicoms(folder: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """One DICOM object per bad kind (each with its own SOP Instance UID and the fake patient name):
    ``kind -> (path, fragment the reason must contain)``."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    from salad_med.dicom.sr import write_score_sr

    folder = Path(folder)
    template = phantom_dicom(folder / ".template.dcm", seed=99)
    out: dict[str, tuple[Path, str]] = {}

    def variant(kind: str, name: str, expect: str) -> tuple[pydicom.Dataset, Path]:
        ds = pydicom.dcmread(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fault", kind])
        out[kind] = (folder / name, expect)
        return ds, folder / name

    ds, path = variant("truncated DICOM", "cut.dcm", "truncated")
    ds.save_as(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    ds, path = variant("DICOM without pixel data", "nopixels.dcm", "without Pixel Data")
    del ds.PixelData
    ds.save_as(path)
    ds, path = variant("multi-frame DICOM", "cine.dcm", "multi-frame")
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)
    ds, path = variant("broken VOI LUT", "badlut.dcm", "VOI LUT")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]  # 4096 entries announced, 100 given
    item.add_new(0x00283006, "OW", (np.arange(100, dtype=np.uint16) * 8).tobytes())
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    out["SR instead of an image"] = (folder / "report.dcm", "structured report")
    write_score_sr(template, 0.5, folder / "report.dcm")
    template.unlink()
    return out


# ------------------------------------------------------------------------------------ file systems
@contextlib.contextmanager
def tmpfs(path: str | os.PathLike, *options: str) -> Iterator[bool]:
    """Mount a tmpfs at ``path`` with ``options`` (e.g. ``"size=16k"``, ``"ro"``); yields whether it
    could (root and ``mount`` needed), unmounting on exit."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        cmd = ["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=1m",)), "tmpfs", str(path)]
        mounted = subprocess.run(cmd, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------------ checks
def error_line(output: str) -> str:
    """The one ``error: ...`` line a failed command prints, which must be its last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "the command printed nothing"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one error line:\n{output}"
    assert lines[-1] == errors[0], f"the error is not one line at the end:\n{output}"
    return errors[0]


def assert_error(result, code: int, *needles: str) -> str:
    """A CLI result failed with exit ``code`` and one error line containing every needle."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{result.output}"
    line = error_line(result.output)
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line: {line}"
    return line


def hidden_files(root: str | os.PathLike) -> list[Path]:
    """Files or folders under ``root`` whose name starts with a dot (atomic writers' temporaries)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob(".*"))


def assert_outputs_parse(root: str | os.PathLike) -> int:
    """Every CSV, JSON(L), YAML and PNG under ``root`` parses; returns how many were checked."""
    import pandas as pd
    import yaml

    n = 0
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if suffix == ".csv":
            pd.read_csv(path)
        elif suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".jsonl":
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix == ".png":
            with Image.open(path) as im:
                im.load()
        else:
            continue
        n += 1
    return n


def phi_hits(roots: Iterable[str | os.PathLike], texts: Iterable[str] = ()) -> list[str]:
    """Where a :data:`PHI_MARKERS` string occurs: text files under ``roots`` and the given texts."""
    hits = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
                text = path.read_text(encoding="utf-8", errors="replace")
                hits += [f"{path}: {m}" for m in PHI_MARKERS if m in text]
    for i, text in enumerate(texts):
        hits += [f"text #{i}: {m}" for m in PHI_MARKERS if m in text]
    return hits


# ------------------------------------------------------------------------------------------- tally
class Tally:
    """Which fault cases were handled: a case counts once its test reached the end of its assertions."""

    def __init__(self, cases: Iterable[str]):
        self.cases = list(cases)
        self.done: set[str] = set()

    def handled(self, case: str) -> None:
        assert case in self.cases, f"undeclared fault case {case!r}"
        self.done.add(case)

    def summary(self) -> str:
        line = f"fault corpus: handled {len(self.done)} / total {len(self.cases)}"
        missing = [c for c in self.cases if c not in self.done]
        if missing:
            named = f": {', '.join(missing)}" if len(missing) <= 8 else ""
            line += f" ({len(missing)} not run or failed{named})"
        return line
