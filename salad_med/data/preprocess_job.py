"""Batch preprocessing behind ``salad-med preprocess``: inputs -> PNG + mask per image, manifest, failures.

For every input of a dataset (enumerated by :mod:`salad_med.data.manifests`) the one pipeline of
:func:`preprocessing.pipelines.get_pipeline` runs in a pool of worker processes; each worker writes
``DIR/images/<image_id>.png`` (8- or 16-bit) and ``DIR/masks/<image_id>.png`` (0/255) atomically.
Then ``DIR/manifest.csv`` (one row per input, ``status`` ok | skipped | failed) and
``DIR/failures.csv`` (``source_path, reason``) are rewritten atomically, sorted by ``image_id``, and
the resolved config is saved as ``DIR/config.yaml``.

* **Journal and resume**: every finished input appends one JSON line to ``DIR/journal.jsonl``
  (``journal.shard-i-of-n.jsonl`` for shards), flushed and fsync'ed, written only after both output
  files are atomically in place: paths relative to ``DIR``, their byte sizes and SHA-256, the
  manifest columns and a hash of the preprocessing settings. A rerun (after a crash, ``kill -9`` or
  a stop at any point of a 40,000-image or sharded run) reads every journal of ``DIR`` and skips the
  inputs whose journalled outputs exist with the same size and SHA-256 under the same settings
  (``status = skipped``); a torn last line, a missing, truncated or altered output, or other settings
  make the input be redone. A previous complete manifest is trusted too (its files must exist).
  ``force`` starts a new journal and redoes everything; a change of settings does the same. An
  unsharded run first removes the temporary files a killed run left in ``DIR``.
* **Bad inputs** never stop the batch: each becomes one ``failures.csv`` row with a reason a person
  understands (``ReadError`` reasons from :mod:`preprocessing.readers`, "no body part found", ...).
* **Shards** (``shard=(i, n)``, ``1 <= i <= n``): a deterministic 1/n of the inputs, chosen by a
  stable hash of the source path relative to the input root; outputs ``manifest.shard-i-of-n.csv``
  and ``failures.shard-i-of-n.csv`` (joined by ``salad-med manifest merge``).
* **Preview**: a contact sheet ``DIR/preview.png`` of N images, each cell captioned with its
  ``image_id`` and label above original | mask | output, wrapped into a grid (index: ``DIR/preview.csv``).

Example:
    >>> summary = run_preprocess("folder", "../shared/data/msk_sample", "out", workers=2)
    >>> print(summary.line())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import yaml

from preprocessing.atomic import (
    MASK_ROW_FILTER,
    atomic_path,
    atomic_write_bytes,
    encode_png,
    remove_stale_temps,
)
from preprocessing.errors import ReadError
from preprocessing.pipelines import root_cause
from salad_med.config import Config, config_to_dict, save_config
from salad_med.errors import ConfigError
from salad_med.log import get_logger, progress

__all__ = [
    "PreprocessSummary",
    "OUTPUT_COLUMNS",
    "parse_shard",
    "shard_of",
    "discover_inputs",
    "run_preprocess",
    "to_png_array",
    "write_preview",
    "Journal",
    "read_journals",
    "journal_file_name",
]

log = get_logger("preprocess")

#: Columns ``salad-med preprocess`` adds to the input manifest (DICOM UIDs are added for DICOM files).
OUTPUT_COLUMNS = ("output_path", "mask_path", "status", "reason", "carrier_found", "inverted", "mask_fraction",
                  "orig_height", "orig_width", "pixel_spacing", "pixel_spacing_col")
_UID_COLUMNS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality")
_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".dic")


@dataclasses.dataclass
class PreprocessSummary:
    """Outcome of :func:`run_preprocess` (counts are per input of this run/shard)."""

    output: Path
    total: int
    ok: int
    skipped: int
    failed: int
    seconds: float
    manifest_path: Path
    failures_path: Path
    preview_path: Path | None = None

    @property
    def succeeded(self) -> int:
        """Inputs with an output (processed now or earlier)."""
        return self.ok + self.skipped

    def line(self) -> str:
        """One-line summary for the console."""
        text = (f"preprocessed {self.total} inputs in {self.seconds:.1f} s: {self.ok} ok, "
                f"{self.skipped} skipped (already done), {self.failed} failed")
        if self.failed:
            text += f" (reasons in {self.failures_path})"
        return f"{text}; manifest {self.manifest_path}"


# ------------------------------------------------------------------------------------ sharding
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)`` (``1 <= i <= n``); ``None``/``""`` -> ``None``.

    Raises:
        ConfigError: not ``i/n`` with ``1 <= i <= n``.
    """
    if not text:
        return None
    try:
        i_text, n_text = str(text).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        msg = f"--shard {text!r}: expected i/n, e.g. 1/4"
        raise ConfigError(msg) from None
    if not 1 <= i <= n:
        msg = f"--shard {text!r}: need 1 <= i <= n (shards count from 1)"
        raise ConfigError(msg)
    return i, n


def shard_of(key: str, n: int) -> int:
    """Shard ``1..n`` of ``key`` (a stable sha256 hash, the same on every machine and run)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % n + 1


def _shard_key(source_path: str, root: Path) -> str:
    """The source path relative to the input root (posix), so shards agree across mount points."""
    try:
        return Path(os.path.abspath(source_path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return Path(source_path).as_posix()


# ---------------------------------------------------------------------------------------- inputs
def _resolve_nih(input_path: Path, labels: Path | None) -> tuple[Path, Path]:
    """``(Data_Entry_2017.csv, images_dir)`` from ``--input`` (folder or CSV) and ``--labels``."""
    if input_path.is_file():
        return input_path, input_path.parent
    for csv in (labels, input_path / "Data_Entry_2017.csv", input_path.parent / "Data_Entry_2017.csv"):
        if csv is not None and Path(csv).is_file():
            return Path(csv), input_path
    msg = f"{input_path}: no Data_Entry_2017.csv here or in its parent (give it with --labels)"
    raise ConfigError(msg)


def _dicom_strays(root: Path, known: set[str]) -> list[tuple[str, str]]:
    """Files of a DICOM tree that the manifest builder skipped, with the reader's reason."""
    from preprocessing.readers import RadiographDicomReader, sniff_format

    reader = RadiographDicomReader()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or name == "DICOMDIR" or os.path.normpath(path) in known:
                continue
            if os.path.splitext(name)[1].lower() not in _DICOM_SUFFIXES:
                try:
                    if sniff_format(path) != "dicom":
                        continue
                except ReadError:
                    continue
            try:
                reader.read(path)
                reason = "DICOM file without SOP Instance UID"
            except ReadError as err:
                reason = err.reason
            out.append((path, reason))
    return out


def discover_inputs(dataset: str, input_path: str | os.PathLike, labels: str | os.PathLike | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """Enumerate the inputs of ``dataset`` with the manifest builders of :mod:`salad_med.data.manifests`.

    Args:
        dataset: ``mura`` (MURA-v1.1 root), ``nih`` (images folder or ``Data_Entry_2017.csv``),
            ``folder`` (``normal/`` + ``abnormal/`` or a labels CSV) or ``dicom`` (any tree).
        input_path: the ``--input`` path.
        labels: ``--labels`` CSV (folder: ``path,label[,patient_id,body_part]``; dicom:
            ``sop_instance_uid|path,label``; nih: ``Data_Entry_2017.csv``).

    Returns:
        ``(manifest, strays, root)``: the input manifest (core columns + optional ones), files the
        builder skipped as not DICOM (``source_path, reason``; DICOM trees only) and the input root.

    Raises:
        ConfigError: unknown dataset, missing input, option not used by the dataset.
        DataError: no inputs found or an invalid labels CSV.
    """
    from salad_med.data.manifests import build_manifest

    root = Path(input_path)
    if dataset not in ("mura", "nih", "folder", "dicom"):
        msg = f"--dataset {dataset!r}: expected mura, nih, folder or dicom"
        raise ConfigError(msg)
    if not root.exists():
        msg = f"--input {root}: no such file or folder"
        raise ConfigError(msg)
    if labels is not None and not Path(labels).is_file() and not (root / labels).is_file():
        msg = f"--labels {labels}: no such file"
        raise ConfigError(msg)
    if dataset == "mura" and labels is not None:
        msg = "--labels is not used with --dataset mura (labels come from the MURA layout)"
        raise ConfigError(msg)
    strays: list[tuple[str, str]] = []
    if dataset == "nih":
        csv, images = _resolve_nih(root, Path(labels) if labels else None)
        df = build_manifest("nih", csv, images_dir=images, check_files=False)
        root = images
    else:
        if dataset in ("mura", "dicom") and not root.is_dir():
            msg = f"--input {root}: --dataset {dataset} expects a folder"
            raise ConfigError(msg)
        df = build_manifest(dataset, root, labels=labels, check_files=False)
        if dataset == "folder" and root.is_file():
            root = root.parent
        if dataset == "dicom":
            strays = _dicom_strays(root, {os.path.normpath(p) for p in df["source_path"]})
    stray_df = pd.DataFrame(strays, columns=["source_path", "reason"])
    return df, stray_df, root


def _safe_rel(image_id: str) -> str:
    """``image_id`` as a relative path inside the output folder (no absolute or ``..`` parts)."""
    parts = [p for p in PurePosixPath(image_id.replace("\\", "/")).parts if p not in ("/", "..", ".", "")]
    return "/".join(parts) or "image"


# ---------------------------------------------------------------------------------------- worker
_WORKER: dict[str, Any] = {}


def _write_output(array: np.ndarray, path: str, row_filter: str = "adaptive") -> tuple[int, str]:
    """Write a PNG atomically; return its byte size and SHA-256 (what the journal records);
    ``row_filter``: see :func:`~preprocessing.atomic.encode_png` (masks: ``MASK_ROW_FILTER``)."""
    data = encode_png(array, name=path, row_filter=row_filter)
    atomic_write_bytes(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def to_png_array(image: Any, bit_depth: int) -> np.ndarray:
    """``(1, H, W)`` or ``(H, W)`` float in [0, 1] -> ``(H, W)`` uint8 (8 bits) or uint16 (16 bits)."""
    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)
    arr = arr.reshape(arr.shape[-2:])
    top = 255.0 if bit_depth == 8 else 65535.0
    return np.rint(np.clip(arr, 0.0, 1.0) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _init_worker(dataset: str, size: int, options: dict[str, Any], bit_depth: int) -> None:
    """Build the pipeline once per process (one thread: the pool is the parallelism).

    Besides torch, the BLAS/OpenMP pools of numpy/scipy get one thread: OpenBLAS wakes its threads for
    small calls (the carrier's plane fits) and they then busy-wait, burning a second core per worker
    (measured: the pipeline's CPU time doubled at unchanged wall time, and the spin ran on into the
    next file's decoding).
    """
    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    from preprocessing.pipelines import get_pipeline

    torch.set_num_threads(1)
    threadpool_limits(1)
    cv2.setNumThreads(1)  # OpenCV's pool (preprocessing.morphology) likewise: one image per worker
    _WORKER.update(pipeline=get_pipeline(dataset, size, **options), bit_depth=bit_depth)


def _meta_row(meta: dict[str, Any]) -> dict[str, Any]:
    spacing = np.asarray(meta.get("pixel_spacing", [np.nan, np.nan]), dtype=np.float64).reshape(-1)
    row = {
        "carrier_found": bool(meta.get("carrier_found", False)),
        "inverted": bool(meta.get("inverted", False)) or bool(meta.get("monochrome1_inverted", False)),
        "mask_fraction": round(float(meta.get("mask_fraction", float("nan"))), 6),
        "orig_height": int(meta.get("orig_height", 0)),
        "orig_width": int(meta.get("orig_width", 0)),
        "pixel_spacing": float(spacing[0]) if spacing.size else float("nan"),
        "pixel_spacing_col": float(spacing[-1]) if spacing.size else float("nan"),
    }
    if str(meta.get("source_format", "")) == "dicom":
        row.update({k: str(meta.get(k, "")) for k in _UID_COLUMNS})
        row["voi"] = str(meta.get("voi", ""))  # VOI LUT | window | none, with the fallback taken, if any
    return row


def _failed(reason: str) -> dict[str, Any]:
    """The fields of a failed input's row (no outputs)."""
    return {"status": "failed", "reason": reason, "output_path": "", "mask_path": ""}


def _in_words(err: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` on one line, at most ``limit`` characters of message."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit] or 'no message'}"


def _work(task: tuple[str, str, str, str]) -> dict[str, Any]:
    """Preprocess one input; never raises (failures come back as a row with a reason)."""
    image_id, source, out_img, out_mask = task
    row: dict[str, Any] = {"image_id": image_id}
    try:
        if "pipeline" not in _WORKER:  # this worker's _init_worker_safe failed (reported by _worker_ready)
            msg = f"the worker could not build the pipeline: {_WORKER.get('init_error', '?')}"
            raise RuntimeError(msg)
        try:
            result = _WORKER["pipeline"]({"image": source})
        except Exception as err:  # noqa: BLE001 - MONAI wraps transform errors; report the original
            raise root_cause(err) from None
        image, mask = result["image"], result["mask"]
        meta = dict(getattr(image, "meta", {}))
        row.update(_meta_row(meta))
        if meta.get("constant_image"):
            reason = "constant image: no contrast, no body part found"
            raise ReadError(source, reason)
        if not row["mask_fraction"] > 0:
            raise ReadError(source, "no body part found (blank image or segmentation found nothing)")
        img_size, img_sha = _write_output(to_png_array(image, _WORKER["bit_depth"]), out_img)
        mask_size, mask_sha = _write_output(to_png_array(mask, 8), out_mask, row_filter=MASK_ROW_FILTER)
        row.update(output_path=out_img, mask_path=out_mask, status="ok", reason="")
        row["_files"] = {"output_size": img_size, "output_sha256": img_sha,
                         "mask_size": mask_size, "mask_sha256": mask_sha}
    except ReadError as err:
        row.update(_failed(err.reason))
    except ValueError as err:  # transforms state bad content in words ("no body part found: ...")
        row.update(_failed(" ".join(str(err).split())[:200] or "ValueError"))
        log.debug("failure on %s", image_id, exc_info=True)
    except Exception as err:  # noqa: BLE001 - one bad input must not stop the batch; report it in words
        row.update(_failed(_in_words(err)))
        log.debug("failure on %s", image_id, exc_info=True)
    if row["status"] == "failed":
        for stale in (out_img, out_mask):
            Path(stale).unlink(missing_ok=True)
    return row


def _pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (pre-loading the pipeline modules once) on Linux, else ``spawn``."""
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["preprocessing.pipelines", "preprocessing.carrier", "preprocessing.segmentation",
                                   "salad_med.data.preprocess_job"])
        return ctx
    return multiprocessing.get_context("spawn")


#: Inputs in flight per worker: enough to keep a worker busy between results, few enough that a worker's death
#: implicates only a handful of inputs.
_IN_FLIGHT_PER_WORKER = 2
#: Reason recorded for an input whose worker process died while preprocessing it, on its own.
WORKER_DIED = ("the worker process died while preprocessing this input on its own (killed by the OS, "
               "e.g. out of memory, or a crash in a decoder)")


def _worker_ready() -> str:
    """Run in a fresh worker: ``""`` when its pipeline was built, else why not."""
    return _WORKER.get("init_error", "")


def _init_worker_safe(*init_args: Any) -> None:
    """:func:`_init_worker` whose failure is reported by :func:`_worker_ready` instead of killing the worker
    (a process pool would start a replacement that fails the same way, forever)."""
    try:
        _init_worker(*init_args)
    except Exception as err:  # noqa: BLE001 - reported to the parent in words, raised there
        _WORKER["init_error"] = _in_words(err, 300)


def _start_pool(workers: int, init_args: tuple) -> Any:
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker_safe, initargs=init_args)
    try:
        error = pool.submit(_worker_ready).result()
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    if error:
        pool.shutdown(cancel_futures=True)
        msg = f"preprocess: the worker processes could not build the pipeline: {error}"
        raise RuntimeError(msg)
    return pool


def _submit(pool: Any, work: Any, queue: list, running: dict) -> bool:
    """Send the last task of ``queue`` to ``pool`` (recorded in ``running``); ``False`` if the pool is broken
    (the task goes back to ``queue``: it was never sent)."""
    from concurrent.futures.process import BrokenProcessPool

    task = queue.pop()
    try:
        running[pool.submit(work, task)] = task
    except BrokenProcessPool:
        queue.append(task)
        return False
    return True


def _run_tasks(tasks: list[tuple[str, str, str, str]], workers: int, init_args: tuple,
               work: Any = None) -> Iterator[dict[str, Any]]:
    """Yield one row per task, in completion order (``work`` = the per-task function, :func:`_work`).

    With ``workers > 1`` the tasks run in a process pool, a few in flight per worker. A worker that dies
    (the OS kills it for memory, a decoder crashes) must neither hang the run nor lose it: the pool is
    replaced, the inputs that were in flight are retried one at a time, and an input that kills a worker
    on its own comes back as a failed row (:data:`WORKER_DIED`); every other input is preprocessed.
    """
    work = work or _work
    if workers <= 1 or len(tasks) <= 1:
        import torch
        from threadpoolctl import threadpool_limits

        from preprocessing.morphology import one_thread

        threads = torch.get_num_threads()
        try:
            with threadpool_limits(1), one_thread():  # restore this process's BLAS/OpenMP/OpenCV threads after
                _init_worker(*init_args)
                for task in tasks:
                    yield work(task)
        finally:
            torch.set_num_threads(threads)
        return
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = list(reversed(tasks))  # popped from the end: input order
    suspects: list[tuple[str, str, str, str]] = []  # in flight when a worker died: retried alone
    pool = _start_pool(workers, init_args)
    try:
        while todo or suspects:
            alone = bool(suspects)
            running: dict[Any, tuple[str, str, str, str]] = {}
            broken = not _submit(pool, work, suspects if alone else todo, running)
            while not alone and not broken and todo and len(running) < workers * _IN_FLIGHT_PER_WORKER:
                broken = not _submit(pool, work, todo, running)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        row = future.result()
                    except BrokenProcessPool:
                        broken = True
                        if alone:  # it died with nothing else in flight: this input killed it
                            log.warning("%s: %s", task[0], WORKER_DIED)
                            yield {"image_id": task[0], **_failed(WORKER_DIED)}
                        else:
                            suspects.append(task)
                        continue
                    yield row
                    if not broken and not alone and todo:
                        broken = not _submit(pool, work, todo, running)
            if broken:
                pool.shutdown(cancel_futures=True)
                if suspects:
                    log.warning("a preprocessing worker died; retrying the %d input(s) it may have been working on "
                                "one at a time", len(suspects))
                if todo or suspects:  # a fresh pool only when there is work left for it
                    pool = _start_pool(workers, init_args)
    finally:
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------- journal
_JOURNAL_VERSION = 1


def journal_file_name(shard: tuple[int, int] | None = None) -> str:
    """``journal.jsonl``, or ``journal.shard-i-of-n.jsonl`` for shard ``(i, n)``."""
    return "journal.jsonl" if shard is None else f"journal.shard-{shard[0]}-of-{shard[1]}.jsonl"


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Journal:
    """Append-only record of finished inputs: one JSON line each, flushed and fsync'ed before returning.

    The journal is the resume point of :func:`run_preprocess`: a line is written only after both
    output files were renamed into place, and names them relative to the output folder with their
    byte size and SHA-256, so a rerun trusts an output only when the very bytes that were journalled
    are on disk (a half-written or altered file is redone). A torn last line (the process killed while
    writing it) is ignored when read and closed with a newline before the next append.

    Args:
        path: the journal file (created with its folder; appended to when it exists).
        fresh: start an empty journal (atomically replacing an old one), e.g. for ``--force``.
    """

    def __init__(self, path: str | os.PathLike, fresh: bool = False) -> None:
        self.path = Path(path)
        if fresh or not self.path.exists():
            atomic_write_bytes(self.path, b"")
        elif self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            if torn:  # a line cut by a kill: end it so the next record starts on its own line
                with open(self.path, "ab") as fh:
                    fh.write(b"\n")
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a JSON line and make it durable (flush + fsync)."""
        self._fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _journal_record(row: dict[str, Any], source_path: str, out_dir: Path, settings_hash: str) -> dict[str, Any]:
    files = row["_files"]
    keep = {k: v for k, v in row.items() if not k.startswith("_") and k not in ("output_path", "mask_path")}
    return {
        "v": _JOURNAL_VERSION, "image_id": row["image_id"], "source_path": source_path, "settings": settings_hash,
        "output": Path(row["output_path"]).relative_to(out_dir).as_posix(), "output_size": files["output_size"],
        "output_sha256": files["output_sha256"], "mask": Path(row["mask_path"]).relative_to(out_dir).as_posix(),
        "mask_size": files["mask_size"], "mask_sha256": files["mask_sha256"], "row": keep,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _journal_lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        log.warning("%s: unreadable journal (%s); its inputs are redone", path, err.strerror or err)
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a torn line (killed while writing) or garbage: not trusted
            continue
        if isinstance(rec, dict) and rec.get("v") == _JOURNAL_VERSION and "image_id" in rec:
            yield rec


def _verified(rec: dict[str, Any], out_dir: Path) -> bool:
    """Both journalled files exist under ``out_dir`` with the journalled size and SHA-256."""
    try:
        for key in ("output", "mask"):
            path = out_dir / rec[key]
            if not path.is_file() or path.stat().st_size != int(rec[f"{key}_size"]):
                return False
            if _sha256_file(path) != rec[f"{key}_sha256"]:
                return False
    except (KeyError, TypeError, ValueError, OSError):
        return False
    return True


def read_journals(out_dir: str | os.PathLike, settings_hash: str) -> dict[str, dict[str, Any]]:
    """Verified journal records of every journal in ``out_dir`` (any shard): ``image_id -> record``.

    Only records written under ``settings_hash`` whose two files exist with the journalled size and
    SHA-256 count; for an input journalled twice the last verified record wins.
    """
    out_dir = Path(out_dir)
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("journal*.jsonl")):
        for rec in _journal_lines(path):
            if rec.get("settings") == settings_hash:
                found[rec["image_id"]] = rec
    return {k: rec for k, rec in found.items() if _verified(rec, out_dir)}


# ---------------------------------------------------------------------------------------- resume
def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _settings(cfg: Config, dataset: str) -> dict[str, Any]:
    pre = config_to_dict(cfg)["preprocess"]
    pre.pop("workers", None)
    return {"dataset": dataset, "preprocess": pre}


def _settings_changed(config_path: Path, current: dict[str, Any]) -> bool:
    if not config_path.is_file():
        return False
    try:
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return True
    pre = dict(saved.get("preprocess") or {})
    pre.pop("workers", None)
    return {"dataset": (saved.get("data") or {}).get("dataset"), "preprocess": pre} != current


def _previous_done(manifest_path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a previous manifest whose outputs exist: ``image_id -> row``."""
    if not manifest_path.is_file():
        return {}
    try:
        prev = pd.read_csv(manifest_path, dtype={"image_id": str, "source_path": str, "output_path": str,
                                                 "mask_path": str, "status": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        log.warning("%s: unreadable previous manifest; redoing everything", manifest_path)
        return {}
    need = {"image_id", "source_path", "output_path", "mask_path", "status"}
    if not need <= set(prev.columns):
        return {}
    done = prev[prev["status"].isin(["ok", "skipped"]) & (prev["output_path"] != "")]
    return {r["image_id"]: r for r in done.to_dict("records")
            if os.path.isfile(r["output_path"]) and os.path.isfile(r["mask_path"])}


# ---------------------------------------------------------------------------------------- preview
def _tile(arr: np.ndarray, tile: int, top: float | None = None) -> np.ndarray:
    """Letterbox a 2-D image into ``tile x tile`` uint8: values ``/ top``, or its 1-99 % window."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if top is not None:
        lo, hi = 0.0, top
    else:
        lo, hi = np.percentile(a[:: max(1, a.shape[0] // 256), :: max(1, a.shape[1] // 256)], (1, 99))
    a = np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)
    scale = tile / max(a.shape)
    size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
    img = Image.fromarray((a * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    out = np.zeros((tile, tile), dtype=np.uint8)
    y, x = (tile - size[1]) // 2, (tile - size[0]) // 2
    out[y:y + size[1], x:x + size[0]] = np.asarray(img)
    return out


_LABEL_NAMES = {0: "normal", 1: "abnormal", -1: "unknown"}
#: Preview caption: PIL's default font, white (255) at (2, 2) on a strip of this height, grey 40.
PREVIEW_CAPTION = 16
_SHEET_GAP = 4


def _label_name(value: Any) -> str:
    try:
        return _LABEL_NAMES.get(int(value), str(value))
    except (TypeError, ValueError):
        return str(value) or "unknown"


def preview_caption(text: str, width: int) -> np.ndarray:
    """The caption strip of a preview tile: ``(PREVIEW_CAPTION, width)`` uint8, ``text`` at (2, 2)."""
    from PIL import Image, ImageDraw

    strip = Image.new("L", (width, PREVIEW_CAPTION), 40)
    ImageDraw.Draw(strip).text((2, 2), text, fill=255)
    return np.asarray(strip)


def write_preview(manifest: pd.DataFrame, path: str | os.PathLike, n: int, tile: int = 256,
                  columns: int | None = None) -> Path | None:
    """Contact sheet PNG of ``n`` images (evenly spread), wrapped into a grid, and its index CSV.

    Each cell is a caption ``"<image_id>  <label>"`` (label: normal, abnormal or unknown) above
    ``original | mask | output`` (``tile`` pixels each); cells fill rows of ``columns`` (default
    ``round(sqrt(n / 3))``, so the sheet is about square). ``path`` with suffix ``.csv``
    (``preview.csv``) lists ``image_id, label, row, column, x, y, width, height`` of every cell.

    Returns:
        The path, or ``None`` when no image has an output.
    """
    from PIL import Image

    from preprocessing.readers import read_radiograph

    done = manifest[manifest["status"].isin(["ok", "skipped"])].reset_index(drop=True)
    if n <= 0 or done.empty:
        return None
    picks = np.unique(np.linspace(0, len(done) - 1, min(n, len(done))).round().astype(int))
    cols = max(1, min(len(picks), columns or round(math.sqrt(len(picks) / 3.0)) or 1))
    gap = _SHEET_GAP
    cell_w, cell_h = 3 * tile + 2 * gap, PREVIEW_CAPTION + tile
    n_rows = math.ceil(len(picks) / cols)
    sheet = np.full((n_rows * cell_h + (n_rows - 1) * gap, cols * cell_w + (cols - 1) * gap), 128, dtype=np.uint8)
    index = []
    for k, i in enumerate(picks):
        r = done.iloc[int(i)]
        try:
            original = read_radiograph(r["source_path"])[0]
        except ReadError:
            original = np.zeros((tile, tile), dtype=np.float32)
        mask = np.asarray(Image.open(r["mask_path"]))
        output = np.asarray(Image.open(r["output_path"]))
        top = 255.0 if output.dtype == np.uint8 else 65535.0
        vgap = np.full((tile, gap), 128, dtype=np.uint8)
        body = np.concatenate([_tile(original, tile), vgap, _tile(mask, tile, 255.0), vgap,
                               _tile(output, tile, top)], axis=1)
        label = _label_name(r.get("label", -1))
        cell = np.concatenate([preview_caption(f"{r['image_id']}  {label}", cell_w), body], axis=0)
        row, col = divmod(k, cols)
        y, x = row * (cell_h + gap), col * (cell_w + gap)
        sheet[y:y + cell_h, x:x + cell_w] = cell
        index.append({"image_id": r["image_id"], "label": label, "row": row, "column": col, "x": x, "y": y,
                      "width": cell_w, "height": cell_h})
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    with atomic_path(Path(path).with_suffix(".csv")) as tmp:
        pd.DataFrame(index).to_csv(tmp, index=False, lineterminator="\n")
    return Path(path)


# ---------------------------------------------------------------------------------------- runner
def _with_outputs(inputs: pd.DataFrame, strays: pd.DataFrame, rows: dict[str, dict[str, Any]],
                  root: Path) -> pd.DataFrame:
    """The output manifest: input columns + :data:`OUTPUT_COLUMNS` (+ UIDs), sorted by ``image_id``."""
    out = pd.DataFrame([rows[i] for i in inputs["image_id"]]) if len(inputs) else pd.DataFrame()
    base = inputs.reset_index(drop=True)
    extra = [c for c in out.columns if c != "image_id" and (c not in base.columns or c in OUTPUT_COLUMNS)]
    merged = pd.concat([base.drop(columns=[c for c in extra if c in base.columns]), out[extra]], axis=1) \
        if len(out) else base
    if len(strays):
        stray_rows = pd.DataFrame({
            "image_id": [_safe_rel(os.path.splitext(_shard_key(p, root))[0]) for p in strays["source_path"]],
            "source_path": strays["source_path"], "patient_id": "", "body_part": "UNKNOWN", "study": "",
            "label": -1, "status": "failed", "reason": strays["reason"], "output_path": "", "mask_path": "",
        })
        stray_rows = stray_rows[~stray_rows["image_id"].isin(set(merged["image_id"]))]
        merged = pd.concat([merged, stray_rows], ignore_index=True)
    for col in OUTPUT_COLUMNS:
        if col not in merged.columns:
            merged[col] = np.nan
    for col in ("output_path", "mask_path", "status", "reason"):
        merged[col] = merged[col].fillna("").astype(str)
    truth = {"true": True, "false": False, "1": True, "0": False}
    for col in ("carrier_found", "inverted"):  # bools, or their text from a previous manifest
        merged[col] = merged[col].map(lambda v: truth.get(str(v).strip().lower(), pd.NA)).astype("boolean")
    for col in ("mask_fraction", "pixel_spacing", "pixel_spacing_col", "orig_height", "orig_width"):
        merged[col] = pd.to_numeric(merged[col].replace("", np.nan), errors="coerce")
    for col in ("orig_height", "orig_width"):
        merged[col] = merged[col].round().astype("Int64")
    first = [c for c in base.columns if c not in OUTPUT_COLUMNS]
    order = first + list(OUTPUT_COLUMNS) + [c for c in merged.columns if c not in first and c not in OUTPUT_COLUMNS]
    return merged[order].sort_values("image_id", kind="stable").reset_index(drop=True)


def run_preprocess(
    dataset: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    cfg: Config | None = None,
    *,
    labels: str | os.PathLike | None = None,
    force: bool = False,
    preview: int = 0,
    shard: tuple[int, int] | None = None,
) -> PreprocessSummary:
    """Preprocess every input of a dataset into ``output`` (see the module docstring).

    Args:
        dataset: ``mura``, ``nih``, ``folder`` or ``dicom``.
        input_path: dataset root / folder / CSV (see :func:`discover_inputs`).
        output: output folder ``DIR``.
        cfg: resolved config (``cfg.preprocess``: size, bit depth, workers, reader and transform
            options); ``None`` = defaults.
        labels: labels CSV (folder, dicom) or ``Data_Entry_2017.csv`` (nih).
        force: redo inputs whose outputs exist.
        preview: number of images on the contact sheet ``DIR/preview.png`` (0 = none).
        shard: ``(i, n)`` to process the ``i``-th of ``n`` deterministic parts only.

    Returns:
        :class:`PreprocessSummary`.

    Raises:
        ConfigError: bad arguments (unknown dataset, missing input).
        DataError: no input found.
    """
    from salad_med.data.manifests import shard_file_name, write_manifest

    start = time.perf_counter()
    cfg = cfg or Config()
    out_dir = Path(output).absolute()  # manifests name files by absolute path: usable from any CWD
    inputs, strays, root = discover_inputs(dataset, input_path, labels)
    if shard is not None:
        i, n = shard
        inputs = inputs[[shard_of(_shard_key(p, root), n) == i for p in inputs["source_path"]]]
        strays = strays[[shard_of(_shard_key(p, root), n) == i for p in strays["source_path"]]]
        manifest_path = out_dir / shard_file_name(i, n)
        failures_path = out_dir / shard_file_name(i, n, "failures")
    else:
        manifest_path, failures_path = out_dir / "manifest.csv", out_dir / "failures.csv"
    inputs = inputs.reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard is None:  # the folder's one writer: clear what a killed run left half-written (shards share it)
        stale = remove_stale_temps(out_dir, recursive=True)
        if stale:
            log.info("%s: removed %d temporary file(s) of an interrupted run", out_dir, len(stale))
    settings = _settings(cfg, dataset)
    settings_hash = _settings_hash(settings)
    if not force and _settings_changed(out_dir / "config.yaml", settings):
        log.warning("%s: preprocessing settings differ from the previous run; redoing every input", out_dir)
        force = True
    save_config(cfg, out_dir / "config.yaml")  # now, so that a run killed midway leaves its settings
    previous = {} if force else _previous_done(manifest_path)
    journalled = {} if force else read_journals(out_dir, settings_hash)

    rows: dict[str, dict[str, Any]] = {}
    tasks = []
    sources: dict[str, str] = {}
    for rec in inputs[["image_id", "source_path"]].itertuples(index=False):
        rel = _safe_rel(rec.image_id)
        out_img, out_mask = str(out_dir / "images" / f"{rel}.png"), str(out_dir / "masks" / f"{rel}.png")
        sources[rec.image_id] = rec.source_path
        prev = previous.get(rec.image_id)
        done = journalled.get(rec.image_id)
        if done is not None and done["source_path"] == rec.source_path and done["output"] == f"images/{rel}.png":
            keep = {k: v for k, v in done["row"].items() if k in (*OUTPUT_COLUMNS, *_UID_COLUMNS, "voi")}
            rows[rec.image_id] = {**keep, "image_id": rec.image_id, "output_path": out_img, "mask_path": out_mask,
                                  "status": "skipped", "reason": ""}
        elif prev is not None and prev["source_path"] == rec.source_path and prev["output_path"] == out_img:
            keep = {k: prev[k] for k in (*OUTPUT_COLUMNS, *_UID_COLUMNS, "voi") if k in prev}
            rows[rec.image_id] = {**keep, "image_id": rec.image_id, "status": "skipped", "reason": ""}
        else:
            tasks.append((rec.image_id, rec.source_path, out_img, out_mask))
    from salad_med.data.dataset import pipeline_options  # the one config -> pipeline conversion

    pre = cfg.preprocess
    init_args = (dataset, pre.size, pipeline_options(cfg), pre.bit_depth)
    workers = max(1, min(pre.workers, len(tasks)))
    log.info("%s: %d inputs (%d to do, %d done before, %d not readable as DICOM) with %d worker(s)",
             out_dir, len(inputs) + len(strays), len(tasks), len(rows), len(strays), workers)
    with Journal(out_dir / journal_file_name(shard), fresh=force) as journal:
        for row in progress(_run_tasks(tasks, workers, init_args), "preprocessing", total=len(tasks)):
            if row["status"] == "ok":  # both files are in place: make the input durable as done
                journal.append(_journal_record(row, sources[row["image_id"]], out_dir, settings_hash))
            row.pop("_files", None)
            rows[row["image_id"]] = row
            if row["status"] == "failed":
                log.debug("failed: %s: %s", row["image_id"], row["reason"])

    manifest = _with_outputs(inputs, strays, rows, root)
    write_manifest(manifest, manifest_path)
    failures = manifest.loc[manifest["status"] == "failed", ["source_path", "reason"]]
    with atomic_path(failures_path) as tmp:
        failures.to_csv(tmp, index=False, lineterminator="\n")
    save_config(cfg, out_dir / "config.yaml")
    preview_path = write_preview(manifest, out_dir / "preview.png", preview) if preview else None
    status = manifest["status"].value_counts()
    return PreprocessSummary(
        output=out_dir, total=len(manifest), ok=int(status.get("ok", 0)), skipped=int(status.get("skipped", 0)),
        failed=int(status.get("failed", 0)), seconds=time.perf_counter() - start, manifest_path=manifest_path,
        failures_path=failures_path, preview_path=preview_path,
    )
