"""Score studies of a DICOMweb archive: QIDO-RS to find them, WADO-RS to fetch CR/DX, STOW-RS to store SRs.

The ``salad-med score --dicomweb URL`` job, study by study:

1. **Query** (QIDO-RS): the studies given by ``--study UID`` (each must exist), or every study whose
   StudyDate is on or after ``--since DATE``; then each study's series, keeping the modalities scored
   (CR and DX by default), and their instances.
2. **Retrieve** (WADO-RS): each instance into a temporary folder under the output folder (deleted when
   the study is done: no copy of the images is left behind), then scored with the run's preprocessing and
   model (:meth:`salad_med.evaluation.inference.RunModel.score_paths`).
3. **Report**: one per-image SR (:mod:`salad_med.dicom.sr`) and one study SR
   (:mod:`salad_med.dicom.study`) under ``output/sr`` and ``output/study_sr``.
4. **Store** (STOW-RS, with ``--stow``): the SRs go back to the archive, except an image's SR when the
   archive already holds a salad-med SR of that image, and the study SR when the archive already holds a
   salad-med study SR of the same images: re-running the job (a ``--since`` sweep) adds nothing twice.

Authentication (:class:`HttpAuth`): HTTP basic (``--user``; the password is read from an environment
variable, ``SALAD_MED_DICOMWEB_PASSWORD`` by default) or a bearer token read from the environment variable
named by ``--token-env``. Secrets are never taken on the command line (they would show in ``ps`` and in the
shell history). TLS certificates are verified by default; ``--ca-bundle`` adds a private CA, ``--insecure``
turns verification off (with a warning).

A failure of one instance or study is recorded (``status=failed`` and the reason in ``scores.csv``) and the
job goes on; a failure to reach or authenticate with the server stops it with one line naming the URL.
Logs hold UIDs only, never patient data.

Example:
    >>> auth = HttpAuth(user="alice")                       # password in $SALAD_MED_DICOMWEB_PASSWORD
    >>> client = open_client("https://pacs.example.org/dicom-web", auth)
    >>> result = score_dicomweb(load_run("runs/demo"), client, "out", since="2024-01-01", stow=True)
    >>> result.scores, result.studies                       # what scores.csv and studies.csv hold

See Also:
    dicomweb-client ``api.py`` (DICOMwebClient); PS3.18 (QIDO-RS, WADO-RS, STOW-RS).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import requests

from salad_med.errors import ConfigError, DataError, SaladMedError
from salad_med.log import get_logger

__all__ = [
    "DEFAULT_PASSWORD_ENV",
    "DEFAULT_MODALITIES",
    "HttpAuth",
    "DicomwebResult",
    "http_session",
    "http_errors",
    "open_client",
    "parse_since",
    "find_studies",
    "image_instances",
    "archived_salad_srs",
    "store_srs",
    "score_dicomweb",
]

#: Environment variable holding the HTTP basic password by default.
DEFAULT_PASSWORD_ENV = "SALAD_MED_DICOMWEB_PASSWORD"
#: Modalities scored by default.
DEFAULT_MODALITIES = ("CR", "DX")
_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_MODALITY, _STUDY_DATE = "00080060", "00080020"
_log = get_logger("dicomweb")


# --------------------------------------------------------------------------- HTTP: auth, TLS, errors
@dataclass(frozen=True)
class HttpAuth:
    """How to authenticate with an HTTP(S) server and check its certificate.

    Attributes:
        user: HTTP basic user (the password comes from the environment variable ``password_env``).
        password_env: name of the environment variable holding the basic password.
        token_env: name of the environment variable holding a bearer token (exclusive with ``user``).
        insecure: do not verify the server's TLS certificate (a warning is logged).
        ca_bundle: PEM file of the CA certificates to trust instead of the system ones.
    """

    user: str | None = None
    password_env: str = DEFAULT_PASSWORD_ENV
    token_env: str | None = None
    insecure: bool = False
    ca_bundle: Path | None = None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_session(url: str, auth: HttpAuth | None = None):
    """A ``requests.Session`` for ``url`` with the credentials and TLS settings of ``auth``.

    Raises:
        ConfigError: the URL is not http(s); both a user and a token; the password or token variable is
            unset or empty; the CA bundle does not exist; ``--insecure`` together with ``--ca-bundle``.
    """
    auth = auth or HttpAuth()
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        msg = f"{url!r}: expected an http:// or https:// URL"
        raise ConfigError(msg)
    if parsed.username or parsed.password:
        msg = f"{parsed.scheme}://...@{parsed.hostname}: credentials in the URL are refused (use --user and " \
              f"the {auth.password_env} environment variable)"
        raise ConfigError(msg)
    session = _Session()
    if auth.user and auth.token_env:
        msg = "--user and --token-env are exclusive: use HTTP basic or a bearer token"
        raise ConfigError(msg)
    if auth.user:
        password = os.environ.get(auth.password_env)
        if not password:
            msg = (f"--user {auth.user}: the password is read from the environment variable {auth.password_env}, "
                   f"which is not set (secrets are never taken on the command line)")
            raise ConfigError(msg)
        session.auth = (auth.user, password)
    elif auth.token_env:
        token = os.environ.get(auth.token_env, "").strip()
        if not token:
            msg = f"--token-env {auth.token_env}: that environment variable is not set or empty"
            raise ConfigError(msg)
        session.headers["Authorization"] = f"Bearer {token}"
    if auth.insecure and auth.ca_bundle:
        msg = "--insecure and --ca-bundle are exclusive"
        raise ConfigError(msg)
    if auth.ca_bundle is not None:
        if not Path(auth.ca_bundle).is_file():
            msg = f"{auth.ca_bundle}: CA bundle not found"
            raise ConfigError(msg)
        session.verify = session.explicit_verify = str(auth.ca_bundle)
    elif auth.insecure:
        session.verify = session.explicit_verify = False
        if parsed.scheme == "https":
            _log.warning("TLS certificate verification is OFF for %s (--insecure): anyone on the network path "
                         "can impersonate the server", parsed.hostname)
        warnings.filterwarnings("ignore", message="Unverified HTTPS request")  # warned once above
    if parsed.scheme == "http" and (auth.user or auth.token_env) and not _is_loopback(parsed.hostname):
        _log.warning("credentials are sent to %s over plain http: use https", parsed.hostname)
    return session


class _Session(requests.Session):
    """A Session whose explicit ``verify`` (``--ca-bundle`` / ``--insecure``) wins over the environment: plain
    requests silently replaces it with ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` when those are set."""

    explicit_verify: bool | str | None = None

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.explicit_verify is not None and verify is None:
            settings["verify"] = self.explicit_verify
        return settings


@contextlib.contextmanager
def http_errors(url: str, what: str = "the server") -> Iterator[None]:
    """Turn ``requests`` failures into one-line :class:`SaladMedError` messages naming ``url``."""
    import requests

    try:
        yield
    except requests.exceptions.SSLError as err:
        msg = (f"{url}: TLS certificate verification failed ({_reason(err)}); give --ca-bundle PEM for a private "
               f"CA (or --insecure, which is not safe)")
        raise SaladMedError(msg) from None
    except requests.exceptions.ConnectionError as err:
        msg = f"{url}: cannot connect to {what} ({_reason(err)})"
        raise SaladMedError(msg) from None
    except requests.exceptions.Timeout:
        msg = f"{url}: {what} did not answer in time"
        raise SaladMedError(msg) from None
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = {401: " (check --user and the password variable, or --token-env)",
                403: " (the credentials are not allowed to do this)"}.get(status, "")
        where = err.request.url if err.request is not None and err.request.url else url
        msg = f"{where}: HTTP {status} {err.response.reason if err.response is not None else ''}{hint}".rstrip()
        raise SaladMedError(msg) from None


def _reason(err: BaseException) -> str:
    text = str(err.args[0] if err.args else err)
    match = re.search(r"\[SSL[^\]]*\][^')\"]*|Connection refused|Name or service not known|timed out", text)
    return (match.group(0) if match else text.splitlines()[0] if text else type(err).__name__)[:200]


def open_client(url: str, auth: HttpAuth | None = None, timeout: float = 60.0):
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` (the DICOMweb root, e.g. ``.../dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url.rstrip("/"), session=http_session(url, auth), timeout=timeout)


# --------------------------------------------------------------------------- QIDO-RS
def _value(item: dict, tag: str, default: str = "") -> str:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else default


def parse_since(text: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` -> ``YYYYMMDD`` (a QIDO StudyDate lower bound).

    Raises:
        ConfigError: not a date.
    """
    from datetime import datetime

    digits = text.strip().replace("-", "")
    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        msg = f"--since {text!r}: expected a date YYYY-MM-DD"
        raise ConfigError(msg) from None
    return digits


def find_studies(client, study_uids: Sequence[str] = (), since: str | None = None) -> list[str]:
    """StudyInstanceUIDs to score: the given ones (each checked with QIDO-RS) or those dated ``since`` or later.

    Raises:
        ConfigError: neither or both of ``study_uids`` and ``since``.
        DataError: a given study is not in the archive.
    """
    if bool(study_uids) == bool(since):
        msg = "give --study UID (repeatable) or --since DATE"
        raise ConfigError(msg)
    url = client.base_url
    with http_errors(url):
        if since:
            found = client.search_for_studies(search_filters={"StudyDate": f"{parse_since(since)}-"},
                                              fields=[_STUDY_DATE], get_remaining=True)
            return sorted({_value(s, _STUDY_UID) for s in found} - {""})
        out = []
        for uid in study_uids:
            if not client.search_for_studies(search_filters={"StudyInstanceUID": uid}):
                msg = f"{url}: study {uid} not found"
                raise DataError(msg)
            out.append(uid)
    return out


def image_instances(client, study_uid: str, modalities: Sequence[str] = DEFAULT_MODALITIES) -> list[tuple[str, str]]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the study's instances in series of ``modalities``."""
    wanted = {m.upper() for m in modalities}
    out = []
    for series in client.search_for_series(study_uid, get_remaining=True):
        if _value(series, _MODALITY).upper() not in wanted:
            continue
        series_uid = _value(series, _SERIES_UID)
        for inst in client.search_for_instances(study_uid, series_uid, get_remaining=True):
            out.append((series_uid, _value(inst, _SOP_UID)))
    return out


def archived_salad_srs(client, study_uid: str) -> tuple[dict[str, str], list]:
    """The salad-med SRs the archive already holds for a study.

    Returns:
        ``({image SOP Instance UID: its SR's SOP Instance UID}, [study SR datasets])``; SRs of other
        software are ignored.
    """
    from salad_med.dicom.sr import read_score_sr
    from salad_med.dicom.study import is_study_sr

    images, studies = {}, []
    for series in client.search_for_series(study_uid, search_filters={"Modality": "SR"}, get_remaining=True):
        if _value(series, _MODALITY).upper() != "SR":
            continue
        for ds in client.retrieve_series(study_uid, _value(series, _SERIES_UID)):
            if is_study_sr(ds):
                studies.append(ds)
                continue
            try:
                report = read_score_sr(ds)
            except (DataError, AttributeError, KeyError, IndexError):
                continue  # another program's SR
            images[report.referenced_sop_instance_uid] = report.sop_instance_uid
    return images, studies


# --------------------------------------------------------------------------- STOW-RS
def store_srs(client, paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """STOW-RS the SR files; returns ``{path: ""}`` for stored ones and ``{path: reason}`` for refused ones."""
    import pydicom

    if not paths:
        return {}
    datasets = [pydicom.dcmread(p) for p in paths]
    by_uid = {str(ds.SOPInstanceUID): str(p) for ds, p in zip(datasets, paths, strict=True)}
    response = client.store_instances(datasets)
    out = dict.fromkeys(map(str, paths), "no answer from the server for this instance")
    for item in response.get("ReferencedSOPSequence", []) if response is not None else []:
        path = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if path:
            out[path] = ""
    for item in response.get("FailedSOPSequence", []) if response is not None else []:
        path = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if path:
            out[path] = f"refused (failure reason 0x{int(item.get('FailureReason', 0)):04X})"
    return out


# --------------------------------------------------------------------------- the job
@dataclass
class DicomwebResult:
    """What :func:`score_dicomweb` did.

    Attributes:
        scores: one row per image (``scores.csv``): the :data:`~salad_med.evaluation.inference.SCORE_COLUMNS`
            plus ``study``, ``study_instance_uid``, ``series_instance_uid``, ``sr_path`` and ``stow``
            (``stored``, ``exists`` = the archive already held a salad-med SR of it, ``failed: reason``, or
            empty without ``--stow``); ``source_path`` is the instance's WADO-RS URL.
        studies: the ranked study table (``studies.csv``) with ``sr_path`` and ``stow``.
        n_stored: SRs stored with STOW-RS.
    """

    scores: pd.DataFrame
    studies: pd.DataFrame
    n_stored: int = 0
    failed_studies: list[str] = field(default_factory=list)


def _fetch(client, study: str, series: str, sop: str, folder: Path) -> Path:
    from preprocessing.atomic import atomic_path

    ds = client.retrieve_instance(study, series, sop)
    path = folder / f"{sop}.dcm"
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _failed_row(study: str, url: str, reason: str, image_id: str = "", series: str = "") -> dict:
    return {"image_id": image_id, "source_path": url, "score": float("nan"), "raw_score": float("nan"),
            "ood": False, "ood_reason": "", "status": "failed", "reason": reason, "study": study,
            "study_instance_uid": study, "series_instance_uid": series, "sr_path": "", "stow": ""}


def score_dicomweb(model, client, output: str | os.PathLike, *, study_uids: Sequence[str] = (),
                   since: str | None = None, stow: bool = False, how: str = "max",
                   modalities: Sequence[str] = DEFAULT_MODALITIES,
                   algorithm_parameters: list[str] | None = None) -> DicomwebResult:
    """Query, retrieve, score and (``stow``) store back, study by study; see the module docstring.

    Args:
        model: a :class:`~salad_med.evaluation.inference.RunModel`.
        client: a DICOMweb client (:func:`open_client`).
        output: folder of ``sr/`` and ``study_sr/`` (the CSVs are written by the caller).
        study_uids: studies to score, or
        since: the first StudyDate to score (``YYYY-MM-DD``).
        stow: store the SRs back with STOW-RS (skipping those the archive already has).
        how: study score aggregation, ``max`` or ``mean``.
        modalities: series modalities scored.
        algorithm_parameters: TID 4019 parameters written into the SRs.

    Raises:
        ConfigError: bad study/date selection.
        DataError: a given study does not exist.
        SaladMedError: the server cannot be reached, refuses the credentials or its certificate.
    """
    from salad_med.dicom.sr import write_score_srs
    from salad_med.dicom.study import aggregate_studies, read_study_sr, write_study_sr

    output = Path(output)
    base = client.base_url.rstrip("/")
    studies = find_studies(client, study_uids, since)
    _log.info("%d study(ies) to score from %s", len(studies), base)
    kwargs = {"algorithm_parameters": algorithm_parameters} if algorithm_parameters else {}
    frames, study_rows, n_stored, failed_studies = [], [], 0, []
    output.mkdir(parents=True, exist_ok=True)
    for study in studies:
        study_url = f"{base}/studies/{study}"
        folder = Path(tempfile.mkdtemp(prefix=".dicomweb-", dir=output))  # same disk; removed below
        try:
            with http_errors(study_url):
                instances = image_instances(client, study, modalities)
                existing_images, existing_studies = archived_salad_srs(client, study) if stow else ({}, [])
            paths, rows = [], []
            for series, sop in instances:
                url = f"{study_url}/series/{series}/instances/{sop}"
                try:
                    with http_errors(url):
                        paths.append((_fetch(client, study, series, sop, folder), url, series))
                except SaladMedError as err:
                    rows.append(_failed_row(study, url, f"cannot retrieve: {err}", sop, series))
                    _log.warning("cannot retrieve %s: %s", sop, err)
            if not instances:
                _log.info("study %s has no %s image", study, "/".join(modalities))
            if not paths and not rows:
                continue
            df = model.score_paths([p for p, _, _ in paths]) if paths else pd.DataFrame()
            if len(df):
                df["sr_path"] = write_score_srs(df, output / "sr", **kwargs)
                local = df["source_path"].tolist()
                df["source_path"] = [u for _, u, _ in paths]
                df["study"] = df["study_instance_uid"] = study
                df["series_instance_uid"] = [s for _, _, s in paths]
                df["stow"] = ""
                ok = df[(df["status"] == "ok") & (df["sr_path"] != "")]
                study_sr = ""
                if len(ok):
                    previous = [ds for ds in existing_studies]
                    study_sr = str(write_study_sr(
                        [local[i] for i in ok.index], ok["score"].tolist(), output / "study_sr" / f"{study}.dcm",
                        raw_scores=ok["raw_score"].tolist(), out_of_distribution=ok["ood"].astype(bool).tolist(),
                        how=how, previous_versions=previous or None, **kwargs))
                study_stow = ""
                if stow:
                    stored, study_stow = _stow_study(client, df, study_sr, existing_images, existing_studies,
                                                     read_study_sr)
                    n_stored += stored
                study_rows.append({"study": study, "sr_path": study_sr, "stow": study_stow})
                frames.append(df)
            if rows:
                frames.append(pd.DataFrame(rows))
        except SaladMedError as err:
            if isinstance(err, (ConfigError, DataError)):
                raise
            if _fatal(err):
                raise
            failed_studies.append(study)
            frames.append(pd.DataFrame([_failed_row(study, study_url, str(err))]))
            _log.warning("study %s failed: %s", study, err)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*_failed_row("", "", "").keys()])
    table = aggregate_studies(scores, how=how) if len(scores) else aggregate_studies(
        pd.DataFrame(columns=["study", "image_id", "score", "raw_score", "status"]), how=how)
    extra = {row["study"]: row for row in study_rows}
    table["sr_path"] = [extra.get(s, {}).get("sr_path", "") for s in table["study"]]
    table["stow"] = [extra.get(s, {}).get("stow", "") for s in table["study"]]
    return DicomwebResult(scores=scores, studies=table, n_stored=n_stored, failed_studies=failed_studies)


def _fatal(err: SaladMedError) -> bool:
    """Errors that will fail every study alike (credentials, certificate, server down): stop the job."""
    text = str(err)
    return any(s in text for s in ("HTTP 401", "HTTP 403", "TLS certificate", "cannot connect"))


def _stow_study(client, df: pd.DataFrame, study_sr: str, existing_images: dict[str, str],
                existing_studies: list, read_study_sr) -> tuple[int, str]:
    """STOW the study's new SRs; fills ``df["stow"]``; returns (SRs stored, the study SR's stow state)."""
    todo = []
    for i, row in df.iterrows():
        if not row["sr_path"]:
            continue
        if row["image_id"] in existing_images:
            df.at[i, "stow"] = "exists"
        else:
            todo.append((i, row["sr_path"]))
    covered = {frozenset(read_study_sr(ds).study_referenced_uids) for ds in existing_studies}
    study_state = ""
    if study_sr:
        import pydicom

        mine = frozenset(read_study_sr(pydicom.dcmread(study_sr)).study_referenced_uids)
        study_state = "exists" if mine in covered else "todo"
    paths = [p for _, p in todo] + ([study_sr] if study_state == "todo" else [])
    with http_errors(client.base_url, "the STOW-RS service"):
        results = store_srs(client, paths)
    stored = 0
    for i, path in todo:
        df.at[i, "stow"] = "stored" if results.get(path) == "" else f"failed: {results.get(path)}"
        stored += results.get(path) == ""
    if study_state == "todo":
        study_state = "stored" if results.get(study_sr) == "" else f"failed: {results.get(study_sr)}"
        stored += study_state == "stored"
    return stored, study_state
