"""A DICOM C-STORE node that scores received radiographs and answers with Structured Reports.

A pynetdicom Storage SCP (with Verification) that a PACS or modality sends CR / DX / Secondary
Capture images to. The life of one instance:

1. **Receive** (association thread, :func:`handle_store`): only calling AE titles in the allow list
   may associate, and only when they address the node by its own AE title (others are rejected at
   association, ``require_calling_aet`` / ``require_called_aet``, and the refusal is audited with the
   calling AE and the called AE it asked for); only CR, DX and
   Secondary Capture presentation contexts are offered, so other SOP classes are refused at
   negotiation. The dataset is checked (decodable, image attributes, pixel data length), written
   atomically and fsync'ed to ``incoming/<SOPInstanceUID>.dcm`` (plus a JSON sidecar with the calling
   AE), and only then is success (0x0000) returned and the UID queued.
2. **Score** (``workers`` threads): batches of up to ``batch_size`` queued files go through the
   scoring callable (the run's preprocessing + model, :meth:`salad_med.evaluation.inference.RunModel.score_paths`).
3. **Report**: an SR (:func:`salad_med.dicom.sr.write_score_sr`) is written to ``sr/<UID>.dcm``, one row
   is appended to ``results.csv``, the image moves to ``done/`` (or ``failed/``).
4. **Forward** (optional, one thread): SRs are linked into ``outbox/`` and C-STOREd to the destination
   with retries and exponential back-off; after the last retry they move to ``forward_failed/`` and
   are retried every ``forward_sweep_s`` seconds and at the next start. Nothing is deleted on failure.
5. **Study report** (optional, ``study_quiet_s`` > 0, one thread): when a study has received and scored
   nothing for ``study_quiet_s`` seconds, one study SR (:mod:`salad_med.dicom.study`: the study score,
   max or mean of its images, and every image's scores) is written to ``study_sr/<StudyInstanceUID>.dcm``,
   recorded in ``studies.csv`` and forwarded like the image SRs. An image arriving later makes a new
   study SR that names the earlier one as its predecessor.

Crash safety: at start, temp files of unfinished writes in ``incoming/`` are deleted (a kill during a
write leaves one; it is not an instance and is never scored), files left in ``incoming/`` are queued again, except those whose UID already
has a ``results.csv`` row (crash between the row and the move), which are only moved: each instance
is scored once. A resent instance already scored, or received and waiting or being scored, is
acknowledged and not scored again. An SR is linked
into ``outbox/`` *before* its row is committed (``results.csv`` / ``studies.csv``) and queued for forwarding
only after; at start, outbox entries without a committed row are removed (their image is scored again),
the others are forwarded: each SR reaches the destination at least once, and a resend of the same SR
(same SOP Instance UID) is a duplicate the archive ignores.

Logs: ``audit.jsonl`` holds one JSON line per event (time, event, SOP Instance UID, calling AE,
status, score, reason). Neither the logs nor ``results.csv`` contain patient names or other PHI.
Append-only logs are appended one line per ``write`` (``O_APPEND``) and fsync'ed; every other file is
written atomically (temp file + rename).

Example:
    >>> from salad_med.evaluation.inference import load_run
    >>> settings = NodeSettings(output_dir="node_out", allowed_aets=("PACS",), port=11112)
    >>> with ScoringNode(settings, load_run("runs/demo").score_paths) as node:
    ...     node.wait()   # until node.stop() (e.g. from a SIGTERM handler)

See Also:
    pynetdicom ``apps/storescp/storescp.py`` (AE setup in one place, one handler per event).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from preprocessing.atomic import atomic_path, atomic_write_text, remove_stale_temps
from salad_med import __version__
from salad_med.dicom.sr import DEFAULT_SERIES_DESCRIPTION, quiet_phi_warnings, write_score_sr
from salad_med.errors import ConfigError, SaladMedError
from salad_med.log import get_logger

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "RESULT_COLUMNS",
    "STUDY_LOG_COLUMNS",
    "STATUS_SUCCESS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
    "ForwardTarget",
    "NodeSettings",
    "ScoringNode",
    "ScoreFn",
    "handle_echo",
    "handle_store",
    "handle_rejected",
    "read_results",
    "iter_audit",
]

#: Storage SOP classes the node accepts (everything else is refused at negotiation).
ACCEPTED_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
#: Columns of ``results.csv`` (no PHI).
RESULT_COLUMNS = ("sop_instance_uid", "study_instance_uid", "calling_ae", "received_at", "scored_at",
                  "latency_s", "score", "raw_score", "ood", "ood_reason", "status", "reason", "image_path", "sr_path")
#: Columns of ``studies.csv``, the study SRs emitted (no PHI).
STUDY_LOG_COLUMNS = ("study_instance_uid", "emitted_at", "n_images", "score", "raw_score", "aggregate",
                     "sr_sop_instance_uid", "sr_path", "image_uids")
# C-STORE statuses (PS3.4 Table B.2-1)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: ``score_fn(paths) -> DataFrame`` with columns ``source_path, score, raw_score, status, reason`` (and
#: ``ood``, ``ood_reason`` when the run has an out-of-distribution guard).
ScoreFn = Callable[[list[Path]], pd.DataFrame]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STOP = object()
_log = get_logger("node")


@dataclass(frozen=True)
class ForwardTarget:
    """Destination of the SRs: ``HOST:PORT:AE``."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> ForwardTarget:
        """Parse ``"HOST:PORT:AE"`` (the host may be an IPv4 address or a name).

        Raises:
            ConfigError: not three fields, or the port is not an integer in 1..65535.
        """
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not all(p.strip() for p in parts):
            msg = f"--forward {text!r}: expected HOST:PORT:AE"
            raise ConfigError(msg)
        host, port, ae = (p.strip() for p in parts)
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            msg = f"--forward {text!r}: port {port!r} is not in 1..65535"
            raise ConfigError(msg)
        return cls(host, int(port), ae)


@dataclass
class NodeSettings:
    """Everything that configures the node and its AE, in one place.

    Attributes:
        output_dir: root of ``incoming/ done/ failed/ sr/ outbox/ forward_failed/ results.csv audit.jsonl``.
        allowed_aets: calling AE titles allowed to associate (at least one).
        ae_title: our AE title; associations whose Called AE Title differs are rejected.
        host: bind address (``"0.0.0.0"``: all interfaces).
        port: TCP port (0: any free port, see :attr:`ScoringNode.port`).
        workers: scoring threads.
        batch_size: most images scored in one call of the scoring callable.
        batch_wait_s: how long a worker waits for more queued images before scoring a partial batch.
        forward: where to C-STORE the SRs (``None``: keep them only on disk).
        forward_retries: extra attempts after a failed forward.
        forward_backoff_s: first retry delay, doubled at each attempt.
        forward_sweep_s: how often SRs in ``forward_failed/`` are tried again (0: only at start).
        study_quiet_s: emit a study SR once a study has been quiet this long (0: no study SR).
        study_aggregate: study score, ``max`` or ``mean`` of the image scores.
        acse_timeout, dimse_timeout, network_timeout: pynetdicom timeouts (seconds).
        maximum_pdu_size: largest PDU we receive (0: unlimited).
        algorithm_name, algorithm_version, series_description: written into each SR.
    """

    output_dir: Path
    allowed_aets: tuple[str, ...]
    ae_title: str = "SALAD"
    host: str = "0.0.0.0"
    port: int = 11112
    workers: int = 1
    batch_size: int = 8
    batch_wait_s: float = 0.05
    forward: ForwardTarget | None = None
    forward_retries: int = 3
    forward_backoff_s: float = 1.0
    forward_sweep_s: float = 60.0
    study_quiet_s: float = 0.0
    study_aggregate: str = "max"
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    maximum_pdu_size: int = 0
    algorithm_name: str = "salad-med"
    algorithm_version: str = __version__
    series_description: str = DEFAULT_SERIES_DESCRIPTION
    algorithm_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.allowed_aets = tuple(a.strip() for a in self.allowed_aets if a and a.strip())
        if not self.allowed_aets:
            msg = "at least one allowed calling AE title is required (--allow AE)"
            raise ConfigError(msg)
        for title in (self.ae_title, *self.allowed_aets):
            if len(title) > 16 or "\\" in title or not title.isprintable():
                msg = f"AE title {title!r}: at most 16 printable characters, no backslash"
                raise ConfigError(msg)
        checks = (("workers", self.workers, 1), ("batch_size", self.batch_size, 1),
                  ("forward_retries", self.forward_retries, 0), ("port", self.port, 0),
                  ("study_quiet_s", self.study_quiet_s, 0), ("forward_sweep_s", self.forward_sweep_s, 0))
        for name, value, low in checks:
            if value < low:
                msg = f"{name} must be >= {low}, got {value}"
                raise ConfigError(msg)
        if self.study_aggregate not in ("max", "mean"):
            msg = f"study_aggregate {self.study_aggregate!r}: expected max or mean"
            raise ConfigError(msg)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and fsync it before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def _validate_image(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be scored as an image (``None`` if it can); forces a full decode.

    Checks image pixel attributes and that Pixel Data is complete: native data holds
    ``Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated / 8`` bytes, encapsulated
    data parses into its frames.
    """
    for elem in ds:  # deferred values raise here on a truncated stream
        _ = elem.value
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PixelData") if k not in ds]
    if missing:
        return f"not an image: missing {', '.join(missing)}"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and UID(syntax).is_encapsulated:
        return _check_fragments(bytes(ds.PixelData), frames)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    expected = (pixels + 7) // 8 if bits == 1 else pixels * bits // 8
    if len(ds.PixelData) < expected:
        return f"pixel data truncated: {len(ds.PixelData)} of {expected} bytes"
    return None


def _check_fragments(buf: bytes, frames: int) -> str | None:
    """Why encapsulated Pixel Data is incomplete (``None`` if every item is whole).

    PS3.5 A.4: a Basic Offset Table item, then one or more non-empty fragment items, each
    ``(FFFE,E000)`` + 4-byte little endian length + value.
    """
    pos, items = 0, []
    while pos < len(buf):
        if len(buf) - pos < 8 or buf[pos:pos + 4] != b"\xfe\xff\x00\xe0":
            return f"encapsulated pixel data: no item tag at byte {pos}"
        length = int.from_bytes(buf[pos + 4:pos + 8], "little")
        if pos + 8 + length > len(buf):
            return f"encapsulated pixel data truncated: item at byte {pos} needs {length} bytes"
        items.append(length)
        pos += 8 + length
    fragments = items[1:]
    if not fragments or not all(fragments):
        return "encapsulated pixel data holds no image fragment"
    if len(fragments) < frames:
        return f"encapsulated pixel data holds {len(fragments)} fragments for {frames} frames"
    return None


# --------------------------------------------------------------------------- event handlers
def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success."""
    return STATUS_SUCCESS


def handle_store(event: evt.Event, node: ScoringNode) -> int:
    """C-STORE: validate, persist atomically, then queue; return the DIMSE status."""
    return node.receive(event)


def handle_rejected(event: evt.Event, node: ScoringNode) -> None:
    """Association rejected (unknown calling AE title, or a called AE title that is not ours): audit it.

    The record names the calling AE, the called AE it asked for and the reason(s); AE titles and the
    peer address only, no PHI.
    """
    requestor = event.assoc.requestor
    calling_ae = (requestor.ae_title or "").strip()
    primitive = requestor.primitive
    called_ae = (str(primitive.called_ae_title or "") if primitive is not None else "").strip()
    reasons = []
    if calling_ae not in node.settings.allowed_aets:
        reasons.append(f"calling AE title {calling_ae!r} is not allowed")
    if called_ae != node.settings.ae_title:
        reasons.append(f"called AE title {called_ae!r} is not this node's ({node.settings.ae_title!r})")
    node.audit("association_rejected", calling_ae=calling_ae, called_ae=called_ae, status="rejected",
               reason="; ".join(reasons) or None, address=requestor.address)
    _log.warning("rejected an association from %s (%s): %s", calling_ae, requestor.address,
                 "; ".join(reasons) or "rejected")


# --------------------------------------------------------------------------- the node
class ScoringNode:
    """Storage SCP + scoring workers + SR forwarder; see the module docstring.

    Args:
        settings: the node configuration.
        score_fn: ``score_fn(paths) -> DataFrame`` with one row per path and columns
            ``source_path, score, raw_score, status ("ok" | other), reason``.

    Attributes:
        dirs: ``incoming, done, failed, sr, study_sr, outbox, forward_failed`` folders.
        results_path: ``results.csv``.
        studies_path: ``studies.csv`` (study SRs emitted).
        audit_path: ``audit.jsonl``.
    """

    def __init__(self, settings: NodeSettings, score_fn: ScoreFn):
        self.settings = settings
        self.score_fn = score_fn
        root = settings.output_dir
        self.dirs = {name: root / name for name in ("incoming", "done", "failed", "sr", "study_sr", "outbox",
                                                   "forward_failed")}
        self.results_path = root / "results.csv"
        self.studies_path = root / "studies.csv"
        self._scored: set[str] = set()  # UIDs with an "ok" results row: acknowledged, never scored again
        self._studies: dict[str, _Study] = {}
        self._study_thread: threading.Thread | None = None
        #: ``() -> bool``: True while more images may be on their way (e.g. a router catching up or cut off
        #: from its archive); no study counts as quiet meanwhile.
        self.study_hold: Callable[[], bool] | None = None
        self._quiet_since = 0.0  # quiet periods start no earlier than this (start, end of a hold)
        self.audit_path = root / "audit.jsonl"
        self._queue: queue.Queue = queue.Queue()
        self._forward_queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._forwarder: threading.Thread | None = None
        self._server = None
        self._stopped = threading.Event()
        self._stopping = threading.Event()
        self._fast_stop = threading.Event()
        self.ae = self._make_ae()

    # ------------------------------------------------------------------ AE setup (one place)
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(s.allowed_aets)
        ae.require_called_aet = True  # refuse associations addressed to another AE title
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.maximum_pdu_size
        ae.connection_timeout = s.acse_timeout
        ae.maximum_associations = 64
        if s.forward is not None:
            ae.add_requested_context(ComprehensiveSRStorage)
        return ae

    def _handlers(self) -> list:
        return [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [self]),
                (evt.EVT_REJECTED, handle_rejected, [self])]

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._server is None:
            msg = "the node is not started"
            raise RuntimeError(msg)
        return int(self._server.server_address[1])

    def start(self) -> ScoringNode:
        """Create folders, recover unscored/unforwarded files, start workers, forwarder and server."""
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        if not self.results_path.exists():
            atomic_write_text(self.results_path, ",".join(RESULT_COLUMNS) + "\n")
        else:
            self._upgrade_results()
        if not self.studies_path.exists():
            atomic_write_text(self.studies_path, ",".join(STUDY_LOG_COLUMNS) + "\n")
        self._load_state()
        self._quiet_since = time.time()  # images routed while the node was down get a full quiet period
        self._recover()
        s = self.settings
        for i in range(s.workers):
            thread = threading.Thread(target=self._work, name=f"salad-worker-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        if s.forward is not None:
            self._forwarder = threading.Thread(target=self._forward_loop, name="salad-forward", daemon=True)
            self._forwarder.start()
        if s.study_quiet_s > 0:
            self._study_thread = threading.Thread(target=self._study_loop, name="salad-study", daemon=True)
            self._study_thread.start()
        try:
            self._server = self.ae.start_server((s.host, s.port), block=False, evt_handlers=self._handlers())
        except OSError as err:
            self.stop(drain=False)
            msg = f"cannot listen on {s.host}:{s.port} ({err.strerror or err})"
            raise SaladMedError(msg) from None
        self.audit("node_started", status="ok", port=self.port, ae_title=s.ae_title,
                   queued=self._queue.qsize())
        _log.info("DICOM node %s listening on %s:%d (allowed: %s)", s.ae_title, s.host, self.port,
                  ", ".join(s.allowed_aets))
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting associations, then (``drain``) score everything queued and forward it.

        Without ``drain`` the workers stop after their current batch; what is left in ``incoming/``
        or ``outbox/`` is picked up at the next start.
        """
        if self._stopped.is_set():
            return
        if self._server is not None:
            self._server.shutdown()  # no new associations
            deadline = time.monotonic() + (timeout or self.settings.network_timeout)
            while self._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
        if not drain:
            self._fast_stop.set()
        for _ in self._workers:
            self._queue.put(_STOP)
        for thread in self._workers:
            thread.join(timeout)
        self._stopping.set()
        if self._study_thread is not None:
            self._study_thread.join(timeout)
        if self._forwarder is not None:
            self._forward_queue.put(_STOP)
            self._forwarder.join(timeout)
        self.audit("node_stopped", status="ok", drained=drain, left=len(self._pending))
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ScoringNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(drain=True)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is queued, being scored or waiting to be forwarded (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._pending)
            if not busy and self._forward_queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------ logs
    def _append(self, path: Path, text: str) -> None:
        """Append whole lines with one ``write`` on an ``O_APPEND`` descriptor, then fsync."""
        data = text.encode("utf-8")
        with self._log_lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def audit(self, event: str, *, sop_instance_uid: str | None = None, calling_ae: str | None = None,
              status: str, score: float | None = None, reason: str | None = None, **extra) -> None:
        """Append one JSON line to ``audit.jsonl`` (UIDs, AE titles, numbers: never patient data)."""
        record = {"time": _now(), "event": event, "sop_instance_uid": sop_instance_uid,
                  "calling_ae": calling_ae, "status": status, "score": score, "reason": reason, **extra}
        self._append(self.audit_path, json.dumps(record, default=str) + "\n")

    def _upgrade_results(self) -> None:
        """Rewrite a ``results.csv`` of an earlier version (other columns) with today's header, atomically;
        columns it lacks are left empty, rows are kept."""
        with open(self.results_path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) == RESULT_COLUMNS:
                return
            rows = list(reader)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.results_path, buf.getvalue())
        _log.info("results.csv upgraded to the current columns (%d rows kept)", len(rows))

    def _append_results(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writerows(rows)
        self._append(self.results_path, buf.getvalue())

    def _outbox_committed(self, path: Path, recorded: set[str], studies: set[str]) -> bool:
        if not path.name.startswith(_STUDY_PREFIX):
            return path.stem in recorded
        try:
            import pydicom

            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - a torn file cannot be committed
            return False
        return uid in studies

    def _emitted_study_srs(self) -> set[str]:
        return {row["sr_sop_instance_uid"] for row in _read_csv_rows(self.studies_path)}

    def _recorded_uids(self) -> set[str]:
        if not self.results_path.exists():
            return set()
        with open(self.results_path, newline="", encoding="utf-8") as fh:
            return {row["sop_instance_uid"] for row in csv.DictReader(fh) if row.get("sop_instance_uid")}

    # ------------------------------------------------------------------ receive (association threads)
    def receive(self, event: evt.Event) -> int:
        """Handle one C-STORE; returns the DIMSE status. Never raises (the node stays up)."""
        calling_ae = event.assoc.requestor.ae_title
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        try:
            return self._receive(event, uid, calling_ae)
        except Exception as err:  # noqa: BLE001 - one bad instance must not stop the node
            self.audit("store", sop_instance_uid=uid or None, calling_ae=calling_ae, status="failed",
                       reason=f"unexpected error: {type(err).__name__}: {err}")
            _log.exception("C-STORE of %s failed", uid or "<no UID>")
            return STATUS_CANNOT_UNDERSTAND

    def _refuse(self, status: int, uid: str, calling_ae: str, reason: str) -> int:
        self.audit("store", sop_instance_uid=uid or None, calling_ae=calling_ae, status="refused",
                   reason=reason, dimse_status=f"0x{status:04X}")
        _log.warning("refused %s from %s: %s", uid or "<no UID>", calling_ae, reason)
        return status

    def _receive(self, event: evt.Event, uid: str, calling_ae: str) -> int:
        if not _UID_RE.match(uid) or len(uid) > 64:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, "", calling_ae,
                                f"invalid Affected SOP Instance UID {uid[:70]!r}")
        try:
            with quiet_phi_warnings():
                ds = event.dataset
                ds.file_meta = event.file_meta
                problem = _validate_image(ds)
        except Exception as err:  # noqa: BLE001 - undecodable stream
            return self._refuse(STATUS_CANNOT_UNDERSTAND, uid, calling_ae, f"cannot decode dataset: {err}")
        if problem is None and str(ds.get("SOPInstanceUID", "")) != uid:
            problem = "SOP Instance UID of the dataset differs from the C-STORE request"
        if problem is not None:
            return self._refuse(STATUS_DATASET_MISMATCH, uid, calling_ae, problem)
        if self.is_scored(uid) or not self._claim(uid):
            self.audit("store", sop_instance_uid=uid, calling_ae=calling_ae, status="duplicate",
                       reason="already scored or being scored; not scored again")
            return STATUS_SUCCESS
        received_at = time.time()
        meta = {"calling_ae": calling_ae, "received_at": received_at,
                "study_instance_uid": str(ds.get("StudyInstanceUID", ""))}
        self._touch_study(meta["study_instance_uid"], uid, received_at)
        try:
            atomic_write_text(self._sidecar(uid), json.dumps(meta))
            _fsync_write(self.dirs["incoming"] / f"{uid}.dcm", event.encoded_dataset(include_meta=True))
        except OSError as err:
            with self._lock:
                self._pending.discard(uid)
            return self._refuse(STATUS_OUT_OF_RESOURCES, uid, calling_ae, f"cannot persist: {err.strerror}")
        self.audit("store", sop_instance_uid=uid, calling_ae=calling_ae, status="queued")
        self._queue.put(uid)
        return STATUS_SUCCESS

    def _claim(self, uid: str) -> bool:
        """Mark ``uid`` pending unless it is scored or already pending (one check under the lock: a resend
        arriving while a worker scores the instance, or just after, is never queued a second time)."""
        with self._lock:
            if uid in self._scored or uid in self._pending:
                return False
            self._pending.add(uid)
            return True

    def _sidecar(self, uid: str) -> Path:
        return self.dirs["incoming"] / f"{uid}.json"

    def is_scored(self, uid: str) -> bool:
        """True when ``uid`` has been scored (an "ok" ``results.csv`` row): a resend is not scored again."""
        with self._lock:
            if uid in self._scored:
                return True
        return (self.dirs["done"] / f"{uid}.dcm").exists()

    def is_known(self, uid: str) -> bool:
        """True when ``uid`` is scored or received and waiting to be scored (routers skip it)."""
        with self._lock:
            if uid in self._pending:
                return True
        return self.is_scored(uid) or (self.dirs["incoming"] / f"{uid}.dcm").exists()

    def _enqueue(self, uid: str) -> None:
        if self._claim(uid):
            self._queue.put(uid)

    def _recover(self) -> None:
        """Queue what a previous run received but did not score, and SRs it did not forward."""
        remove_stale_temps(self.dirs["incoming"])  # a write the previous run did not finish: not an instance
        incoming = sorted(self.dirs["incoming"].glob("*.dcm"), key=lambda p: p.stat().st_mtime)
        recorded = self._recorded_uids()
        requeued = 0
        for path in incoming:
            uid = path.stem
            if uid in recorded:  # crashed after the results row, before the move
                self._finish_files(uid, "done")
            else:
                meta = self._read_sidecar(uid)
                self._touch_study(meta.get("study_instance_uid", ""), uid, meta.get("received_at", time.time()))
                self._enqueue(uid)
                requeued += 1
        committed_studies = self._emitted_study_srs()
        for stale in self.dirs["outbox"].glob(".*.link"):  # a link being made when the node stopped
            stale.unlink(missing_ok=True)
        for path in sorted(self.dirs["outbox"].glob("*.dcm")):
            if not self._outbox_committed(path, recorded, committed_studies):
                path.unlink(missing_ok=True)  # crashed before the commit: the image is scored again
        for path in sorted(self.dirs["forward_failed"].glob("*.dcm")):
            os.replace(path, self.dirs["outbox"] / path.name)
        outbox = sorted(self.dirs["outbox"].glob("*.dcm"))
        if self.settings.forward is not None:
            for path in outbox:
                self._forward_queue.put(path)
        if requeued or outbox:
            self.audit("recovered", status="ok", requeued=requeued, to_forward=len(outbox))
            _log.info("recovered %d unscored instance(s), %d SR(s) to forward", requeued, len(outbox))

    # ------------------------------------------------------------------ score (worker threads)
    def _next_batch(self) -> tuple[list[str], bool]:
        item = self._queue.get()
        if item is _STOP:
            return [], True
        batch, stop = [item], False
        deadline = time.monotonic() + self.settings.batch_wait_s
        while len(batch) < self.settings.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _work(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch and not (self._fast_stop.is_set()):
                try:
                    self._score_batch(batch)
                except Exception:  # noqa: BLE001 - keep the worker alive; files stay in incoming/
                    _log.exception("scoring batch of %d failed unexpectedly", len(batch))
                finally:
                    with self._lock:
                        self._pending.difference_update(batch)
            if stop:
                return

    def _run_score_fn(self, paths: list[Path]) -> dict[str, dict]:
        """``{str(path): row}`` from the scoring callable; a crash fails the batch, not the node."""
        try:
            frame = self.score_fn(paths)
        except Exception as err:  # noqa: BLE001 - record the failure for each image
            reason = f"scoring failed: {type(err).__name__}: {err}"
            return {str(p): {"status": "failed", "reason": reason} for p in paths}
        rows = {}
        for row in frame.to_dict("records"):
            rows[str(Path(row["source_path"]))] = row
        return rows

    def _score_batch(self, uids: Sequence[str]) -> None:
        s = self.settings
        paths = [self.dirs["incoming"] / f"{uid}.dcm" for uid in uids]
        results = self._run_score_fn(paths)
        records, to_forward = [], []
        for uid, path in zip(uids, paths, strict=True):
            meta = self._read_sidecar(uid)
            row = results.get(str(path), {"status": "failed", "reason": "no result from the scorer"})
            score, raw = row.get("score"), row.get("raw_score")
            status, reason = str(row.get("status", "failed")), str(row.get("reason") or "")
            sr_path = ""
            if status == "ok" and not _finite(score):
                status, reason = "failed", f"non-finite score {score!r}"
            if status == "ok":
                try:
                    sr_path = str(write_score_sr(
                        path, float(score), self.dirs["sr"] / f"{uid}.dcm",
                        algorithm_name=s.algorithm_name, algorithm_version=s.algorithm_version,
                        raw_score=float(raw) if _finite(raw) else None,
                        out_of_distribution=bool(row.get("ood", False)),
                        series_description=s.series_description,
                        algorithm_parameters=s.algorithm_parameters or None))
                except Exception as err:  # noqa: BLE001 - e.g. a source without Study UID
                    status, reason = "failed", f"cannot write SR: {err}"
            scored_at = time.time()
            records.append({
                "sop_instance_uid": uid, "study_instance_uid": meta.get("study_instance_uid", ""),
                "calling_ae": meta.get("calling_ae", ""), "received_at": f"{meta.get('received_at', 0):.3f}",
                "scored_at": f"{scored_at:.3f}",
                "latency_s": f"{scored_at - meta['received_at']:.3f}" if "received_at" in meta else "",
                "score": f"{float(score):.10g}" if status == "ok" else "",
                "raw_score": f"{float(raw):.10g}" if status == "ok" and _finite(raw) else "",
                "ood": str(bool(row.get("ood", False))).lower() if status == "ok" else "",
                "ood_reason": str(row.get("ood_reason") or "") if status == "ok" else "",
                "status": status, "reason": reason,
                "image_path": str(Path("done" if status == "ok" else "failed") / f"{uid}.dcm"),
                "sr_path": sr_path,
            })
            if sr_path:
                to_forward.append(Path(sr_path))
        # outbox links before the commit, queued after it: see _recover
        links = [self._link_outbox(sr, sr.name) for sr in to_forward] if s.forward is not None else []
        self._append_results(records)  # the row is the commit point (see _recover)
        self._note_scored(records)
        for rec in records:
            self._finish_files(rec["sop_instance_uid"], "done" if rec["status"] == "ok" else "failed")
            self.audit("scored" if rec["status"] == "ok" else "score_failed",
                       sop_instance_uid=rec["sop_instance_uid"], calling_ae=rec["calling_ae"],
                       status=rec["status"], score=float(rec["score"]) if rec["score"] else None,
                       reason=rec["reason"] or None)
        for link in links:
            self._forward_queue.put(link)

    def _link_outbox(self, src: Path, name: str) -> Path:
        """Hard-link ``src`` as ``outbox/name``, replacing an older link of that name atomically."""
        link = self.dirs["outbox"] / name
        tmp = self.dirs["outbox"] / f".{name}.{threading.get_ident()}.link"
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, link)
        return link

    # ------------------------------------------------------------------ study state and study SRs
    def _touch_study(self, study: str, uid: str, when: float) -> None:
        if not study:
            return
        with self._lock:
            state = self._studies.setdefault(study, _Study())
            state.pending.add(uid)
            state.last_activity = max(state.last_activity, float(when))

    def _note_scored(self, records: list[dict]) -> None:
        now = time.time()
        with self._lock:
            for rec in records:
                uid, study = rec["sop_instance_uid"], rec["study_instance_uid"]
                if rec["status"] == "ok":
                    self._scored.add(uid)
                if not study:
                    continue
                state = self._studies.setdefault(study, _Study())
                state.pending.discard(uid)
                state.last_activity = now
                if rec["status"] == "ok":
                    state.images[uid] = _image_entry(rec)

    def _load_state(self) -> None:
        """Scored UIDs and per-study state from ``results.csv`` and ``studies.csv`` (crash-safe restart)."""
        with self._lock:
            for row in _read_csv_rows(self.results_path):
                if row.get("status") != "ok" or not row.get("sop_instance_uid"):
                    continue
                uid, study = row["sop_instance_uid"], row.get("study_instance_uid", "")
                self._scored.add(uid)
                if study and _finite(row.get("score")):
                    state = self._studies.setdefault(study, _Study())
                    state.images[uid] = _image_entry(row)
                    if _finite(row.get("scored_at")):
                        state.last_activity = max(state.last_activity, float(row["scored_at"]))
            for row in _read_csv_rows(self.studies_path):
                state = self._studies.setdefault(row["study_instance_uid"], _Study())
                state.emitted = set((row.get("image_uids") or "").split())
                state.last_sr_uid = row.get("sr_sop_instance_uid", "")

    def studies_due(self, now: float | None = None) -> list[str]:
        """Studies whose study SR is due: scored images not yet reported, nothing pending, quiet long enough
        (since their last image, the node's start and the end of the last :attr:`study_hold`)."""
        now = time.time() if now is None else now
        quiet = self.settings.study_quiet_s
        if self.study_hold is not None and self.study_hold():
            self._quiet_since = now
            return []
        with self._lock:
            return [study for study, st in self._studies.items()
                    if st.images and not st.pending and set(st.images) != st.emitted
                    and now - max(st.last_activity, self._quiet_since) >= quiet]

    def _study_loop(self) -> None:
        tick = min(1.0, max(0.05, self.settings.study_quiet_s / 4))
        while not self._stopping.wait(tick):
            for study in self.studies_due():
                try:
                    self._emit_study(study)
                except Exception as err:  # noqa: BLE001 - try again after the next quiet period
                    with self._lock:
                        self._studies[study].last_activity = time.time()
                    self.audit("study_report_failed", status="failed", study_instance_uid=study,
                               reason=f"{type(err).__name__}: {err}")
                    _log.warning("cannot write the study SR of %s: %s", study, err)

    def _emit_study(self, study: str) -> Path | None:
        """Write, commit (``studies.csv``) and queue the study SR of ``study``."""
        import pydicom
        from pydicom.uid import generate_uid

        from salad_med.dicom.study import aggregate, write_study_sr

        s = self.settings
        with self._lock:
            state = self._studies[study]
            images = dict(state.images)
            previous_uid = state.last_sr_uid
        uids = [u for u in sorted(images) if (self.dirs["done"] / f"{u}.dcm").exists()]
        if not uids:
            with self._lock:
                state.emitted = set(images)
            return None
        path = self.dirs["study_sr"] / f"{study}.dcm"
        previous = None
        if previous_uid and path.exists():
            with quiet_phi_warnings():
                prev = pydicom.dcmread(path, stop_before_pixels=True)
            previous = [prev] if str(prev.SOPInstanceUID) == previous_uid else None
        sr_uid = generate_uid()
        entries = [images[u] for u in uids]
        write_study_sr([self.dirs["done"] / f"{u}.dcm" for u in uids], [e[0] for e in entries], path,
                       raw_scores=[e[1] for e in entries], out_of_distribution=[e[2] for e in entries],
                       how=s.study_aggregate, algorithm_name=s.algorithm_name, algorithm_version=s.algorithm_version,
                       algorithm_parameters=s.algorithm_parameters or None, sop_instance_uid=sr_uid,
                       series_instance_uid=generate_uid(
                           entropy_srcs=[f"{study}|salad-med study SR|{s.algorithm_name}"]),  # one series per study
                       previous_versions=previous)
        link = self._link_outbox(path, f"{_STUDY_PREFIX}{study}.dcm") if s.forward is not None else None
        raws = [e[1] for e in entries if e[1] is not None]
        row = {"study_instance_uid": study, "emitted_at": f"{time.time():.3f}", "n_images": len(uids),
               "score": f"{aggregate([e[0] for e in entries], s.study_aggregate):.10g}",
               "raw_score": f"{aggregate(raws, s.study_aggregate):.10g}" if len(raws) == len(uids) else "",
               "aggregate": s.study_aggregate, "sr_sop_instance_uid": sr_uid,
               "sr_path": str(Path("study_sr") / path.name), "image_uids": " ".join(uids)}
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=STUDY_LOG_COLUMNS, lineterminator="\n").writerow(row)
        self._append(self.studies_path, buf.getvalue())  # the commit point of the study SR
        with self._lock:
            state.emitted = set(uids)
            state.last_sr_uid = sr_uid
        self.audit("study_reported", status="ok", study_instance_uid=study, n_images=len(uids),
                   score=float(row["score"]), sr_sop_instance_uid=sr_uid)
        if link is not None:
            self._forward_queue.put(link)
        return path

    def _read_sidecar(self, uid: str) -> dict:
        try:
            return json.loads(self._sidecar(uid).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _finish_files(self, uid: str, where: str) -> None:
        src = self.dirs["incoming"] / f"{uid}.dcm"
        if src.exists():
            os.replace(src, self.dirs[where] / src.name)
        self._sidecar(uid).unlink(missing_ok=True)

    # ------------------------------------------------------------------ forward (one thread)
    def _sweep_forward_failed(self) -> None:
        """Move SRs whose forwarding failed back to the outbox and queue them again."""
        for path in sorted(self.dirs["forward_failed"].glob("*.dcm")):
            target = self.dirs["outbox"] / path.name
            os.replace(path, target)
            self._forward_queue.put(target)

    def _forward_loop(self) -> None:
        sweep = self.settings.forward_sweep_s
        next_sweep = time.monotonic() + sweep
        while True:
            if sweep and time.monotonic() >= next_sweep:  # busy or idle: failed SRs get another chance
                next_sweep = time.monotonic() + sweep
                try:
                    self._sweep_forward_failed()
                except OSError:
                    _log.exception("cannot move forward_failed/ SRs back to the outbox")
            try:
                item = self._forward_queue.get(timeout=max(0.01, next_sweep - time.monotonic()) if sweep else None)
            except queue.Empty:
                continue
            if item is _STOP:
                self._forward_queue.task_done()
                return
            batch = [item]
            while len(batch) < 64:
                try:
                    nxt = self._forward_queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._forward_queue.put(_STOP)
                    self._forward_queue.task_done()
                    break
                batch.append(nxt)
            try:
                self._forward(batch)
            except Exception:  # noqa: BLE001 - files stay in outbox/, retried at next start
                _log.exception("forwarding failed unexpectedly")
            finally:
                for _ in batch:
                    self._forward_queue.task_done()

    def _forward(self, paths: list[Path]) -> None:
        target = self.settings.forward
        assert target is not None
        pending, reason = [p for p in dict.fromkeys(paths) if p.exists()], ""  # sent already: skip
        for attempt in range(self.settings.forward_retries + 1):
            if attempt:
                time.sleep(self.settings.forward_backoff_s * 2 ** (attempt - 1))
            pending, reason = self._send(target, pending)
            if not pending:
                return
        for path in pending:
            if not path.exists():
                continue
            os.replace(path, self.dirs["forward_failed"] / path.name)
            self.audit("forward_failed", sop_instance_uid=path.stem, status="failed", reason=reason,
                       destination=f"{target.host}:{target.port}:{target.ae_title}")
            _log.warning("could not forward the SR of %s: %s", path.stem, reason)

    def _send(self, target: ForwardTarget, paths: list[Path]) -> tuple[list[Path], str]:
        """One association; returns the paths not stored and the last reason."""
        assoc = self.ae.associate(target.host, target.port, ae_title=target.ae_title)
        if not assoc.is_established:
            return paths, f"association with {target.ae_title}@{target.host}:{target.port} failed"
        failed, reason = [], ""
        try:
            for i, path in enumerate(paths):
                if not path.exists():  # replaced by a newer version already sent
                    continue
                try:
                    status = assoc.send_c_store(path)
                except Exception as err:  # noqa: BLE001 - e.g. the peer aborted: retry the rest later
                    failed.extend(paths[i:])
                    reason = f"C-STORE failed: {type(err).__name__}: {err}"
                    break
                code = getattr(status, "Status", None)
                if code == STATUS_SUCCESS:
                    path.unlink(missing_ok=True)
                    self.audit("forwarded", sop_instance_uid=path.stem, status="ok",
                               destination=f"{target.host}:{target.port}:{target.ae_title}")
                else:
                    failed.append(path)
                    reason = "no response" if code is None else f"C-STORE status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return failed, reason

    # ------------------------------------------------------------------ reading results
    def results(self) -> pd.DataFrame:
        """``results.csv`` as a DataFrame (UIDs kept as strings)."""
        return read_results(self.results_path)


_STUDY_PREFIX = "study-"


@dataclass
class _Study:
    """What the node knows of one study: scored images, images still pending, the last study SR."""

    images: dict = field(default_factory=dict)  # SOP Instance UID -> (score, raw score | None, ood)
    pending: set = field(default_factory=set)
    emitted: set = field(default_factory=set)  # the images of the last committed study SR
    last_activity: float = 0.0
    last_sr_uid: str = ""


def _image_entry(row: dict) -> tuple[float, float | None, bool]:
    raw = row.get("raw_score")
    return float(row["score"]), float(raw) if _finite(raw) else None, str(row.get("ood", "")).lower() == "true"


def _read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a node's ``results.csv`` with UID and AE columns as strings."""
    return pd.read_csv(path, dtype={"sop_instance_uid": str, "study_instance_uid": str, "calling_ae": str,
                                    "reason": str, "sr_path": str, "image_path": str},
                       keep_default_na=False, na_values={"score": [""], "raw_score": [""],
                                                         "latency_s": [""]})


def iter_audit(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of an ``audit.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
