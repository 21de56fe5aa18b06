"""Orthanc: route CR/DX instances to the scoring node without losing any, run a local Orthanc, audit an archive.

**Routing** (:class:`OrthancRouter`). The node is declared in Orthanc's ``DicomModalities``; the router,
a thread of ``salad-med serve --route-from URL``, follows Orthanc's change log (``GET /changes``, REST)
and asks Orthanc to C-STORE each new CR/DX instance to the node (``POST /modalities/{id}/store``,
synchronous). Its position in the change log is saved (atomically, in the node folder) only once the
node has acknowledged the instances, and the node acknowledges only what it has persisted, so:

* the node stopped or killed: the instances stored meanwhile are sent when it is back (the change log
  is in Orthanc's database);
* Orthanc stopped or killed: the router retries with back-off and carries on from its saved position;
* an instance sent twice (a crash between the store and the save) is acknowledged by the node as a
  duplicate, not scored again; instances the node already knows are not even sent.

An instance the node refuses (e.g. a truncated image) is tried ``max_attempts`` times while Orthanc
answers, then recorded in the node's ``audit.jsonl`` (``route_failed``) and skipped.

Orthanc's own Lua routing (:func:`lua_route_script`, ``SendToModality`` in ``OnStoredInstance``) is simpler
to set up and has a lower latency, but Orthanc logs and drops an instance whose send fails (node down or
restarting): use it only where the node is always up, or together with the router.

**A local Orthanc** (:class:`LocalOrthanc`) for tests and benchmarks: a generated JSON configuration
(loopback ports, optional DICOMweb plugin, users, Lua scripts, TLS), started and stopped as a subprocess.

**Archive audit** (:func:`archive_inventory`): every image, per-image SR and study SR an Orthanc holds,
with the UIDs they reference and their scores (REST), to check "each image exactly one SR".

Example:
    >>> router = OrthancRouter("http://pacs:8042", "salad", node, HttpAuth(user="salad"))
    >>> router.start()   # ... router.stop()

See Also:
    Orthanc Book, "Auto-routing" and the REST API (``/changes``, ``/modalities/{id}/store``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from preprocessing.atomic import atomic_write_text
from salad_med.dicom.dicomweb import HttpAuth, http_session
from salad_med.errors import ConfigError, SaladMedError
from salad_med.log import get_logger

__all__ = [
    "DEFAULT_ROUTE_PASSWORD_ENV",
    "OrthancRouter",
    "OrthancUnreachable",
    "LocalOrthanc",
    "ArchiveInventory",
    "archive_inventory",
    "find_orthanc",
    "find_dicomweb_plugin",
    "orthanc_missing_reason",
    "lua_route_script",
    "free_port",
]

#: Environment variable holding the Orthanc REST password of ``salad-med serve --route-user`` by default.
DEFAULT_ROUTE_PASSWORD_ENV = "SALAD_MED_ORTHANC_PASSWORD"
_log = get_logger("orthanc")
_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins",
                "/usr/lib/x86_64-linux-gnu/orthanc", "/usr/lib/aarch64-linux-gnu/orthanc")


class OrthancUnreachable(SaladMedError):
    """Orthanc's REST API does not answer (it may be restarting)."""


class _Unavailable(Exception):
    """Orthanc could not be reached or answered with a server error: retry later, count nothing."""


# --------------------------------------------------------------------------- routing
class OrthancRouter:
    """Send every new CR/DX instance of an Orthanc archive to the scoring node; see the module docstring.

    Args:
        url: Orthanc's REST root (``http://host:8042``).
        modality: the node's identifier in Orthanc's ``DicomModalities``.
        node: the :class:`~salad_med.dicom.node.ScoringNode` (its ``is_known`` and ``audit`` are used).
        auth: credentials and TLS settings for the REST API.
        modalities: series modalities routed.
        state_path: where the change-log position is saved (default: ``node folder/orthanc_route.json``).
        poll_s: wait between two polls of an up-to-date change log.
        batch: changes read (and instances sent) per request.
        max_attempts: sends of one instance refused while Orthanc answers before it is skipped.
        start: ``"now"`` (first start: skip the changes already in the log) or ``"beginning"``.
        backoff_max_s: longest wait between retries while Orthanc is unreachable.
    """

    def __init__(self, url: str, modality: str, node, auth: HttpAuth | None = None,
                 modalities: Sequence[str] = ("CR", "DX"), state_path: str | os.PathLike | None = None,
                 poll_s: float = 0.5, batch: int = 100, max_attempts: int = 3, start: str = "now",
                 backoff_max_s: float = 30.0, timeout: float = 120.0):
        if start not in ("now", "beginning"):
            msg = f"start {start!r}: expected now or beginning"
            raise ConfigError(msg)
        self.url = url.rstrip("/")
        self.modality = modality
        self.node = node
        self.session = http_session(self.url, auth)
        self.modalities = {m.upper() for m in modalities}
        self.state_path = Path(state_path) if state_path else Path(node.settings.output_dir) / "orthanc_route.json"
        self.poll_s, self.batch, self.max_attempts = float(poll_s), int(batch), int(max_attempts)
        self.start_at, self.backoff_max_s, self.timeout = start, float(backoff_max_s), float(timeout)
        self._series_modality: dict[str, str] = {}
        self._attempts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._behind = True  # until the change log has been read to its end
        self.routed = 0

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, **kwargs):
        import requests

        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.exceptions.RequestException as err:
            msg = f"{type(err).__name__}"
            raise _Unavailable(msg) from None
        if resp.status_code in (401, 403):
            msg = f"{self.url}{path}: HTTP {resp.status_code} (check --route-user and its password variable)"
            raise SaladMedError(msg)
        return resp

    def _get(self, path: str) -> dict | None:
        resp = self._request("GET", path)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            msg = f"GET {path}: HTTP {resp.status_code}"
            raise _Unavailable(msg)
        return resp.json()

    def check(self) -> None:
        """Fail clearly when Orthanc cannot be reached, refuses the credentials or lacks the modality.

        Raises:
            OrthancUnreachable: no answer (Orthanc down or restarting).
            SaladMedError: HTTP 401/403, or ``modality`` not declared in ``DicomModalities``.
        """
        try:
            system = self._get("/system")
            modalities = self._get("/modalities")
        except _Unavailable as err:
            msg = f"{self.url}: cannot reach Orthanc's REST API ({err})"
            raise OrthancUnreachable(msg) from None
        if system is None or modalities is None:
            msg = f"{self.url}: not an Orthanc REST API (no /system)"
            raise SaladMedError(msg)
        if self.modality not in modalities:
            msg = (f"{self.url}: no modality {self.modality!r} in Orthanc's DicomModalities (declared: "
                   f"{', '.join(modalities) or 'none'}); declare the node there")
            raise SaladMedError(msg)

    # ------------------------------------------------------------------ state
    def _load_cursor(self) -> int | None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return int(state["last"]) if state.get("url") == self.url and "last" in state else None

    def _save_cursor(self, last: int) -> None:
        atomic_write_text(self.state_path, json.dumps({"url": self.url, "modality": self.modality, "last": last}))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OrthancRouter:
        """Follow Orthanc's change log in a thread (call :meth:`check` first to fail early on bad settings)."""
        self.node.study_hold = self.is_behind
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="salad-orthanc-route", daemon=True)
        self._thread.start()
        return self

    def is_behind(self) -> bool:
        """True while the change log has not been read to its end or Orthanc is unreachable."""
        return self._behind

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        backoff, down_since = 1.0, None
        cursor = self._load_cursor()
        while not self._stop.is_set():
            try:
                if cursor is None:
                    cursor = 0 if self.start_at == "beginning" else int(self._get("/changes?last")["Last"])
                    self._save_cursor(cursor)
                    self.node.audit("route_started", status="ok", archive=self.url, cursor=cursor)
                cursor, done = self._step(cursor)
                if down_since is not None:
                    _log.info("Orthanc at %s is reachable again after %.0f s", self.url, time.time() - down_since)
                    self.node.audit("route_resumed", status="ok", archive=self.url, cursor=cursor)
                backoff, down_since = 1.0, None
                self._behind = not done
                if done:
                    self._stop.wait(self.poll_s)
            except _Unavailable as err:
                if self._stop.is_set():
                    break
                self._behind = True
                if down_since is None:
                    down_since = time.time()
                    _log.warning("Orthanc at %s unavailable (%s): retrying", self.url, err)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            except Exception as err:  # noqa: BLE001 - keep routing; say why once per failure
                _log.error("routing from %s failed: %s", self.url, err)
                self.node.audit("route_error", status="failed", archive=self.url, reason=str(err)[:300])
                self._stop.wait(min(backoff * 4, self.backoff_max_s))

    def _step(self, cursor: int) -> tuple[int, bool]:
        """Read one page of the change log, send its new CR/DX instances, save the position."""
        page = self._get(f"/changes?since={cursor}&limit={self.batch}")
        if page is None:
            msg = "GET /changes: HTTP 404"
            raise _Unavailable(msg)
        todo = []
        for change in page.get("Changes", []):
            if change.get("ChangeType") != "NewInstance":
                continue
            item = self._instance(change["ID"])
            if item is not None:
                todo.append(item)
        if todo:
            self._send(todo)
        last = int(page.get("Last", cursor))
        if last != cursor:
            self._save_cursor(last)
        return last, bool(page.get("Done", True))

    def _instance(self, orthanc_id: str) -> tuple[str, str] | None:
        """``(Orthanc ID, SOP Instance UID)`` of an instance to route, or None (deleted, other modality, known)."""
        info = self._get(f"/instances/{orthanc_id}")
        if info is None:
            return None  # deleted since
        series = info.get("ParentSeries", "")
        if series not in self._series_modality:
            sinfo = self._get(f"/series/{series}") or {}
            if len(self._series_modality) > 10000:
                self._series_modality.clear()
            self._series_modality[series] = str(sinfo.get("MainDicomTags", {}).get("Modality", "")).upper()
        if self._series_modality[series] not in self.modalities:
            return None
        uid = str(info.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
        if not uid or self.node.is_known(uid):
            return None
        return orthanc_id, uid

    def _store(self, ids: list[str]) -> tuple[bool, str]:
        resp = self._request("POST", f"/modalities/{self.modality}/store",
                             json={"Resources": ids, "Synchronous": True})
        if resp.status_code == 200:
            return True, ""
        try:
            details = resp.json().get("Details") or resp.json().get("Message") or ""
        except ValueError:
            details = resp.text[:200]
        return False, f"HTTP {resp.status_code}: {details}"[:300]

    def _send(self, items: list[tuple[str, str]]) -> None:
        ok, _ = self._store([oid for oid, _ in items])
        if ok:
            self.routed += len(items)
            return
        # one by one: find what failed; a refused instance is skipped after max_attempts
        for oid, uid in items:
            while not self._stop.is_set():
                ok, reason = (True, "") if self.node.is_known(uid) else self._store([oid])
                if ok or self.node.is_known(uid):
                    self.routed += 1
                    self._attempts.pop(uid, None)
                    break
                self._get("/system")  # raises _Unavailable when Orthanc itself is down
                attempts = self._attempts[uid] = self._attempts.get(uid, 0) + 1
                if attempts >= self.max_attempts:
                    self.node.audit("route_failed", sop_instance_uid=uid, status="failed", reason=reason,
                                    archive=self.url, attempts=attempts)
                    _log.warning("could not route %s after %d attempts: %s", uid, attempts, reason)
                    self._attempts.pop(uid, None)
                    break
                self._stop.wait(min(2.0 ** attempts, self.backoff_max_s))
            if self._stop.is_set():
                msg = "stopping"
                raise _Unavailable(msg)


def lua_route_script(modality: str = "salad", modalities: Sequence[str] = ("CR", "DX")) -> str:
    """Orthanc Lua routing: ``OnStoredInstance`` sends CR/DX instances to ``modality`` (see the caveat above)."""
    wanted = ", ".join(f"['{m.upper()}'] = true" for m in modalities)
    return f"""-- salad-med: send {'/'.join(modalities)} instances to the scoring node (Orthanc Lua routing)
local wanted = {{ {wanted} }}
function OnStoredInstance(instanceId, tags, metadata, origin)
  if wanted[string.upper(tags['Modality'] or '')] then
    SendToModality(instanceId, '{modality}')
  end
end
"""


# --------------------------------------------------------------------------- a local Orthanc
def find_orthanc() -> str | None:
    """Path of the ``Orthanc`` server binary (PATH, then /usr/sbin), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    for candidate in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin (``libOrthancDicomWeb.so``), or None."""
    for folder in _PLUGIN_DIRS:
        path = Path(folder)
        if path.is_dir():
            found = sorted(path.glob("libOrthancDicomWeb.so*"))
            if found:
                return str(found[0])
    return None


def orthanc_missing_reason(dicomweb: bool = False) -> str:
    """One line saying what is missing to run a local Orthanc (empty when nothing is)."""
    if find_orthanc() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb and find_dicomweb_plugin() is None:
        return f"Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb; looked in " \
               f"{', '.join(_PLUGIN_DIRS)})"
    return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalOrthanc:
    """An Orthanc server on loopback ports with a generated configuration, run as a subprocess.

    Attributes:
        root: folder of ``orthanc.json``, the database (``db/``) and ``orthanc.log``.
        modalities: ``{id: (AE title, host, port)}`` written to ``DicomModalities``.
        users: ``{user: password}``; when given, HTTP basic authentication is on.
        dicomweb: load the DICOMweb plugin (root ``/dicom-web/``).
        lua_scripts: Lua source texts, written next to the configuration and loaded.
        extra: more configuration keys (override the generated ones).
        aet, http_port, dicom_port: Orthanc's AE title and ports (0: a free port).
    """

    root: Path
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    users: dict[str, str] | None = None
    dicomweb: bool = True
    lua_scripts: Sequence[str] = ()
    extra: dict = field(default_factory=dict)
    aet: str = "ORTHANC"
    http_port: int = 0
    dicom_port: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        self.process: subprocess.Popen | None = None
        self._log_fh = None

    @property
    def url(self) -> str:
        """REST root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict:
        """The configuration written to ``orthanc.json``."""
        scripts = []
        for i, text in enumerate(self.lua_scripts):
            path = self.root / f"script{i}.lua"
            atomic_write_text(path, text)
            scripts.append(str(path))
        plugins = []
        if self.dicomweb:
            plugin = find_dicomweb_plugin()
            if plugin is None:
                raise SaladMedError(orthanc_missing_reason(dicomweb=True))
            plugins.append(plugin)
        cfg = {
            "Name": "salad-med-test", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "HttpServerEnabled": True, "OrthancExplorerEnabled": False,
            "WebDavEnabled": False, "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": dict(self.users or {}),
            "Plugins": plugins, "LuaScripts": scripts, "StableAge": 2, "ConcurrentJobs": 2, "JobsHistorySize": 100,
            "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 1, "HttpThreadsCount": 20, "DicomThreadsCount": 32,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"}
        cfg.update(self.extra)
        return cfg

    def start(self, timeout: float = 60.0) -> LocalOrthanc:
        """Write the configuration, start Orthanc and wait until its REST API answers.

        Raises:
            SaladMedError: Orthanc is not installed, exits, or does not answer within ``timeout``.
        """
        binary = find_orthanc()
        if binary is None:
            raise SaladMedError(orthanc_missing_reason())
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "orthanc.json", json.dumps(self.config(), indent=2))
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([binary, str(self.root / "orthanc.json")], stdout=self._log_fh,
                                        stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        import requests

        session = requests.Session()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                msg = f"Orthanc exited at start: {self.log_tail()}"
                raise SaladMedError(msg)
            try:
                session.get(f"{self.url}/system", timeout=2)  # any HTTP answer (401 included): it is up
                return
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        msg = f"Orthanc did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}"
        raise SaladMedError(msg)

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """SIGTERM (Orthanc finishes its work and closes its database) or SIGKILL (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def restart(self, kill: bool = False, timeout: float = 60.0) -> None:
        """Stop (``kill``: SIGKILL) and start again on the same ports and database."""
        self.stop(kill=kill)
        self.start(timeout)

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- archive audit
@dataclass
class ArchiveInventory:
    """What an Orthanc archive holds (no PHI: UIDs, modalities and scores only).

    Attributes:
        instances: ``orthanc_id, sop_instance_uid, series_instance_uid, study_instance_uid, modality``.
        image_srs: salad-med per-image SRs: ``sr_sop_instance_uid, study_instance_uid,
            referenced_sop_instance_uid, score, raw_score, out_of_distribution``.
        study_srs: salad-med study SRs: ``sr_sop_instance_uid, study_instance_uid, score, raw_score,
            aggregate, referenced`` (tuple of image UIDs), ``image_scores`` ({uid: score}).
    """

    instances: pd.DataFrame
    image_srs: pd.DataFrame
    study_srs: pd.DataFrame

    def srs_per_image(self, modalities: Sequence[str] = ("CR", "DX")) -> pd.Series:
        """Number of per-image SRs referencing each image of ``modalities`` (index: SOP Instance UID)."""
        wanted = {m.upper() for m in modalities}
        images = self.instances[self.instances["modality"].isin(wanted)]["sop_instance_uid"]
        counts = self.image_srs["referenced_sop_instance_uid"].value_counts()
        return pd.Series([int(counts.get(u, 0)) for u in images], index=images.to_numpy(), dtype=int)


def archive_inventory(url: str, auth: HttpAuth | None = None,
                      get: Callable[[str], object] | None = None) -> ArchiveInventory:
    """Every instance of an Orthanc archive, and the salad-med SRs (downloaded and read) with what they reference.

    Raises:
        SaladMedError: the REST API cannot be read.
    """
    import pydicom

    from salad_med.dicom.sr import read_score_sr
    from salad_med.dicom.study import is_study_sr, read_study_sr
    from salad_med.errors import DataError

    session = http_session(url, auth)
    base = url.rstrip("/")

    def _get(path: str, raw: bool = False):
        resp = session.get(base + path, timeout=120)
        if resp.status_code != 200:
            msg = f"{base}{path}: HTTP {resp.status_code}"
            raise SaladMedError(msg)
        return resp.content if raw else resp.json()

    series = {s["ID"]: s for s in _get("/series?expand")}
    studies = {s["ID"]: s for s in _get("/studies?expand")}
    rows = []
    for inst in _get("/instances?expand"):
        ser = series.get(inst.get("ParentSeries"), {})
        study = studies.get(ser.get("ParentStudy"), {})
        rows.append({"orthanc_id": inst["ID"], "sop_instance_uid": inst["MainDicomTags"].get("SOPInstanceUID", ""),
                     "series_instance_uid": ser.get("MainDicomTags", {}).get("SeriesInstanceUID", ""),
                     "study_instance_uid": study.get("MainDicomTags", {}).get("StudyInstanceUID", ""),
                     "modality": str(ser.get("MainDicomTags", {}).get("Modality", "")).upper()})
    instances = pd.DataFrame(rows, columns=["orthanc_id", "sop_instance_uid", "series_instance_uid",
                                            "study_instance_uid", "modality"])
    image_rows, study_rows = [], []
    import io

    for row in instances[instances["modality"] == "SR"].itertuples(index=False):
        ds = pydicom.dcmread(io.BytesIO(_get(f"/instances/{row.orthanc_id}/file", raw=True)))
        if is_study_sr(ds):
            rep = read_study_sr(ds)
            study_rows.append({"sr_sop_instance_uid": rep.sop_instance_uid, "study_instance_uid": rep.study_instance_uid,
                               "score": rep.score, "raw_score": rep.raw_score, "aggregate": rep.aggregate,
                               "referenced": rep.study_referenced_uids,
                               "image_scores": {u: s.score for u, s in rep.images.items()}})
            continue
        try:
            rep = read_score_sr(ds)
        except (DataError, AttributeError, KeyError, IndexError):
            continue  # not a salad-med SR
        image_rows.append({"sr_sop_instance_uid": rep.sop_instance_uid, "study_instance_uid": str(ds.StudyInstanceUID),
                           "referenced_sop_instance_uid": rep.referenced_sop_instance_uid, "score": rep.score,
                           "raw_score": rep.raw_score, "out_of_distribution": rep.out_of_distribution})
    return ArchiveInventory(
        instances=instances,
        image_srs=pd.DataFrame(image_rows, columns=["sr_sop_instance_uid", "study_instance_uid",
                                                    "referenced_sop_instance_uid", "score", "raw_score",
                                                    "out_of_distribution"]),
        study_srs=pd.DataFrame(study_rows, columns=["sr_sop_instance_uid", "study_instance_uid", "score",
                                                    "raw_score", "aggregate", "referenced", "image_scores"]))
