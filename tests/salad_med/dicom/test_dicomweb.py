"""``salad-med score --dicomweb``: QIDO-RS, WADO-RS and STOW-RS against Orthanc's DICOMweb plugin (real server).

Orthanc runs on loopback with HTTP basic authentication; other servers test a bearer token (an Orthanc Lua
HTTP filter) and HTTPS with a self-signed certificate (openssl) through a TLS-terminating proxy, as sites
put nginx in front of Orthanc (Debian's Orthanc 1.10 crashes in its own HTTPS server: see docs/pacs.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.dicom.dicomweb import HttpAuth, http_session, parse_since
from salad_med.dicom.orthanc import LocalOrthanc, archive_inventory, orthanc_missing_reason
from salad_med.dicom.study import read_study_sr
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool, storescu_groups
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run
from salad_med.synthetic.phantom import write_dicom_tree

STORESCU = dcmtk_tool("storescu")
pytestmark = [
    pytest.mark.skipif(bool(orthanc_missing_reason(dicomweb=True)), reason=orthanc_missing_reason(dicomweb=True) or "-"),
    pytest.mark.skipif(STORESCU is None, reason=dcmtk_missing_reason("storescu")),
]
USER, PASSWORD, PW_ENV = "alice", "dicomweb-secret", "SALAD_MED_DICOMWEB_PASSWORD"
#: raw scores of one image scored in batches of different size: float32 convolutions differ by ~1e-7
#: relative with the batch size, Eq. 4 reduces in float64 per query (see tests/salad_med/test_export.py)
RAW_REL = 1e-5


def _store(port: int, paths) -> None:
    for options, files in storescu_groups(paths):
        done = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "ORTHANC", *options, "127.0.0.1", str(port),
                               *map(str, files)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _score(run_dir, url, out, *args, env=None):
    env = {**os.environ, PW_ENV: PASSWORD, **(env or {})}
    return CliRunner(env=env).invoke(app, ["score", "--run", str(run_dir), "--dicomweb", url, "-o", str(out), *args])


@pytest.fixture(scope="module")
def archive(tmp_path_factory, dicom_sample):
    """Orthanc (DICOMweb, basic auth) holding 3 phantom studies of 2 CR/DX views and one OT image."""
    root = tmp_path_factory.mktemp("dicomweb")
    files = write_dicom_tree(root / "phantoms", n=6, seed=31, size=(96, 96))
    orthanc = LocalOrthanc(root / "orthanc", users={USER: PASSWORD}).start()
    _store(orthanc.dicom_port, [*files.source_path, dicom_sample / "vlut_04.dcm"])
    files["study_date"] = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyDate) for p in files.source_path]
    yield orthanc, files
    orthanc.stop()


@pytest.fixture(scope="module")
def run_dir(tiny_dicom_run):
    return tiny_dicom_run.run_dir


class TlsProxy:
    """A TLS-terminating TCP proxy (Python's ssl) in front of an HTTP port, like nginx in front of Orthanc."""

    def __init__(self, cert: Path, key: Path, target_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, tls), daemon=True).start()
        pipe(tls, upstream)

    def close(self) -> None:
        self.sock.close()


def _inventory(orthanc, monkeypatch):
    monkeypatch.setenv(PW_ENV, PASSWORD)
    return archive_inventory(orthanc.url, HttpAuth(user=USER))


def test_score_studies_stow_and_rerun_adds_nothing(archive, run_dir, tmp_path, monkeypatch):
    orthanc, files = archive
    studies = list(dict.fromkeys(files.study_instance_uid))[:2]
    args = [a for s in studies for a in ("--study", s)]
    result = _score(run_dir, orthanc.dicomweb_url, tmp_path / "a", *args, "--stow", "--user", USER)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert "stored 6 SR(s) with STOW-RS" in result.output  # 4 image SRs + 2 study SRs
    scores = pd.read_csv(tmp_path / "a" / "scores.csv", dtype=str, keep_default_na=False)
    mine = files[files.study_instance_uid.isin(studies)]
    assert sorted(scores.image_id) == sorted(mine.sop_instance_uid)
    assert (scores.status == "ok").all() and (scores.stow == "stored").all()
    assert scores.source_path.str.startswith(f"{orthanc.dicomweb_url}/studies/").all()  # WADO-RS URLs
    assert not list((tmp_path / "a").glob(".dicomweb-*"))  # no copy of the images left behind
    # the scores are those of the files themselves
    ref = load_run(run_dir).score_paths(mine.source_path.tolist()).set_index("image_id")
    for row in scores.itertuples(index=False):
        assert float(row.raw_score) == pytest.approx(ref.loc[row.image_id, "raw_score"], rel=RAW_REL)
    # study ranking: max of the image raw scores, most abnormal first, with a study SR each
    ranked = pd.read_csv(tmp_path / "a" / "studies.csv", dtype={"study": str, "study_instance_uid": str})
    assert ranked["rank"].tolist() == [1, 2]
    expected = scores.assign(raw=scores.raw_score.astype(float)).groupby("study_instance_uid")["raw"].max()
    assert ranked.raw_score.tolist() == pytest.approx(sorted(expected, reverse=True))
    assert (ranked.stow == "stored").all()
    for row in ranked.itertuples(index=False):
        report = read_study_sr(row.sr_path)
        assert set(report.images) == set(mine[mine.study_instance_uid == row.study_instance_uid].sop_instance_uid)
    # the archive now holds exactly one SR per scored image and one study SR per study
    inv = _inventory(orthanc, monkeypatch)
    counts = inv.image_srs.referenced_sop_instance_uid.value_counts()
    assert sorted(counts.index) == sorted(mine.sop_instance_uid) and (counts == 1).all()
    assert sorted(inv.study_srs.study_instance_uid) == sorted(studies)
    # a rerun (a sweep) scores again but stores nothing twice
    again = _score(run_dir, orthanc.dicomweb_url, tmp_path / "b", *args, "--stow", "--user", USER)
    assert again.exit_code == 0, again.output
    assert "stored 0 SR(s)" in again.output
    rerun = pd.read_csv(tmp_path / "b" / "scores.csv", dtype=str, keep_default_na=False)
    assert (rerun.stow == "exists").all()
    assert (pd.read_csv(tmp_path / "b" / "studies.csv").stow == "exists").all()
    inv2 = _inventory(orthanc, monkeypatch)
    assert len(inv2.image_srs) == len(inv.image_srs) and len(inv2.study_srs) == len(inv.study_srs)


def test_since_selects_studies_by_date_and_skips_other_modalities(archive, run_dir, tmp_path):
    orthanc, files = archive
    dates = sorted(set(files.study_date))
    newest = files[files.study_date == dates[-1]]
    result = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--since",
                    f"{dates[-1][:4]}-{dates[-1][4:6]}-{dates[-1][6:]}", "--user", USER)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv", dtype=str, keep_default_na=False)
    assert sorted(scores.image_id) == sorted(newest.sop_instance_uid)
    assert (scores.stow == "").all()  # without --stow nothing goes back
    everything = _score(run_dir, orthanc.dicomweb_url, tmp_path / "all", "--since", "1900-01-01", "--user", USER)
    assert everything.exit_code == 0, everything.output
    scored = pd.read_csv(tmp_path / "all" / "scores.csv", dtype=str, keep_default_na=False)
    assert sorted(scored.image_id) == sorted(files.sop_instance_uid)  # the OT study (vlut_04) is not scored
    future = _score(run_dir, orthanc.dicomweb_url, tmp_path / "none", "--since", "2999-01-01", "--user", USER)
    assert future.exit_code == 1 and "no study dated 2999-01-01 or later" in future.output
    ot_only = _score(run_dir, orthanc.dicomweb_url, tmp_path / "ot", "--study", "1.2.276.0.7230010.3.200.2",
                     "--user", USER)  # vlut_04's study: stored, but no CR/DX image in it
    assert ot_only.exit_code == 1 and "no CR/DX image" in ot_only.output


def test_credentials_errors_are_one_line_and_never_on_the_command_line(archive, run_dir, tmp_path):
    orthanc, files = archive
    study = files.study_instance_uid.iloc[0]
    no_env = CliRunner(env={k: v for k, v in os.environ.items() if k != PW_ENV}).invoke(
        app, ["score", "--run", str(run_dir), "--dicomweb", orthanc.dicomweb_url, "--study", study, "--user", USER,
              "-o", str(tmp_path)])
    assert no_env.exit_code == 2 and PW_ENV in no_env.output and "never taken on the command line" in no_env.output
    wrong = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--study", study, "--user", USER, env={PW_ENV: "nope"})
    assert wrong.exit_code == 1 and "HTTP 401" in wrong.output and "nope" not in wrong.output
    anonymous = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--study", study)
    assert anonymous.exit_code == 1 and "HTTP 401" in anonymous.output
    both = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--study", study, "--user", USER, "--token-env", "T")
    assert both.exit_code == 2 and "exclusive" in both.output
    in_url = _score(run_dir, orthanc.dicomweb_url.replace("://", f"://{USER}:{PASSWORD}@"), tmp_path, "--study", study)
    assert in_url.exit_code == 2 and "credentials in the URL are refused" in in_url.output
    assert PASSWORD not in in_url.output
    missing = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--study", "1.2.3.4", "--user", USER)
    assert missing.exit_code == 1 and "study 1.2.3.4 not found" in missing.output
    neither = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--user", USER)
    assert neither.exit_code == 2 and "--study UID" in neither.output
    files_too = _score(run_dir, orthanc.dicomweb_url, tmp_path, str(files.source_path.iloc[0]), "--study", study)
    assert files_too.exit_code == 2 and "not both" in files_too.output
    assert not (tmp_path / "scores.csv").exists()


def test_parse_since_and_session_settings(tmp_path, monkeypatch):
    assert parse_since("2024-02-29") == "20240229" and parse_since("20240101") == "20240101"
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        parse_since("2024-02-30")
    monkeypatch.setenv("TOK", "abc")
    session = http_session("https://pacs.example.org/dicom-web", HttpAuth(token_env="TOK"))
    assert session.headers["Authorization"] == "Bearer abc" and session.verify is True  # TLS checked by default
    with pytest.raises(ConfigError, match="CA bundle not found"):
        http_session("https://pacs", HttpAuth(ca_bundle=tmp_path / "none.pem"))
    with pytest.raises(ConfigError, match="http:// or https://"):
        http_session("ftp://pacs", HttpAuth())


def test_bearer_token_from_the_environment(run_dir, tmp_path, archive):
    """Orthanc with a Lua HTTP filter that only lets ``Authorization: Bearer <token>`` through."""
    _, files = archive
    lua = ("function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
           "  return httpHeaders['authorization'] == 'Bearer tok-123'\nend\n")
    orthanc = LocalOrthanc(tmp_path / "orthanc", lua_scripts=[lua]).start()
    try:
        subset = files.iloc[:2]
        _store(orthanc.dicom_port, subset.source_path)
        study = subset.study_instance_uid.iloc[0]
        ok = _score(run_dir, orthanc.dicomweb_url, tmp_path / "ok", "--study", study, "--token-env", "PACS_TOKEN",
                    "--stow", env={"PACS_TOKEN": "tok-123"})
        assert ok.exit_code == 0, ok.output
        assert "tok-123" not in ok.output
        refused = _score(run_dir, orthanc.dicomweb_url, tmp_path / "no", "--study", study, "--token-env",
                         "PACS_TOKEN", env={"PACS_TOKEN": "wrong"})
        assert refused.exit_code == 1 and "HTTP 403" in refused.output
    finally:
        orthanc.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_verified_by_default_ca_bundle_and_insecure(run_dir, tmp_path, archive):
    _, files = archive
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                           str(cert)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    orthanc = LocalOrthanc(tmp_path / "orthanc").start()
    proxy = TlsProxy(cert, key, orthanc.http_port)
    url = f"https://127.0.0.1:{proxy.port}/dicom-web"
    try:
        subset = files.iloc[2:4]
        _store(orthanc.dicom_port, subset.source_path)
        study = subset.study_instance_uid.iloc[0]
        default = _score(run_dir, url, tmp_path / "d", "--study", study)
        assert default.exit_code == 1
        assert "TLS certificate verification failed" in default.output and "--ca-bundle" in default.output
        trusted = _score(run_dir, url, tmp_path / "t", "--study", study, "--ca-bundle", str(cert))
        assert trusted.exit_code == 0, trusted.output
        insecure = _score(run_dir, url, tmp_path / "i", "--study", study, "--insecure")
        assert insecure.exit_code == 0, insecure.output
        assert "verification is OFF" in insecure.output
        a = pd.read_csv(tmp_path / "t" / "scores.csv")
        b = pd.read_csv(tmp_path / "i" / "scores.csv")
        np.testing.assert_allclose(a.raw_score, b.raw_score, rtol=RAW_REL)
    finally:
        proxy.close()
        orthanc.stop()


def test_no_image_copy_and_no_phi_in_outputs(archive, run_dir, tmp_path):
    orthanc, files = archive
    study = files.study_instance_uid.iloc[-1]
    result = _score(run_dir, orthanc.dicomweb_url, tmp_path, "--study", study, "--user", USER)
    assert result.exit_code == 0, result.output
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in files.source_path}
    text = result.output + (tmp_path / "scores.csv").read_text() + (tmp_path / "studies.csv").read_text()
    for name in names:
        assert name not in text and name.split("^")[0] not in text
    assert not [p for p in Path(tmp_path).rglob("*.dcm") if "sr" not in p.parent.name]  # only SRs were written
