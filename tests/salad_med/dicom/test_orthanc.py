"""A real PACS round trip: Orthanc -> scoring node -> Orthanc, with restarts, kill -9 and concurrent load.

Each test starts its own Orthanc (Debian packages ``orthanc``; see ``.ci/run``) on free loopback ports with
a generated configuration and asks Orthanc's REST API what the archive holds at the end: never a mock.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from benchmarks.pacs_roundtrip import NodeProcess, run_roundtrip, serve_command
from salad_med.dicom.dicomweb import HttpAuth
from salad_med.dicom.node import ForwardTarget, NodeSettings, ScoringNode, read_results
from salad_med.dicom.orthanc import (
    LocalOrthanc,
    OrthancRouter,
    OrthancUnreachable,
    archive_inventory,
    free_port,
    lua_route_script,
    orthanc_missing_reason,
)
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool, storescu_groups
from salad_med.evaluation.inference import load_run
from salad_med.synthetic.phantom import write_dicom_tree

STORESCU, ECHOSCU = dcmtk_tool("storescu"), dcmtk_tool("echoscu")
pytestmark = [
    pytest.mark.skipif(bool(orthanc_missing_reason()), reason=orthanc_missing_reason() or "-"),
    pytest.mark.skipif(not (STORESCU and ECHOSCU),
                       reason="; ".join(dcmtk_missing_reason(t) for t in ("storescu", "echoscu") if not dcmtk_tool(t))),
    pytest.mark.dcmtk,
]
USER, PASSWORD = "salad", "route-secret"  # Orthanc REST credentials of the router (the password via env)
#: The node and this test score an image with the same model but in batches of different size: the encoder's
#: float32 convolutions differ by ~1e-7 relative with the batch size (Eq. 4 reduces in float64 per query),
#: so raw scores agree to RAW_REL (a 50x margin, as in tests/salad_med/test_export.py), not bit for bit; the
#: calibrated score is monotone in the raw one and lies inside the calibration of that band.
RAW_REL = 1e-5
#: The node keeps image scores to 10 significant digits (results.csv) for its study SR.
KEPT_REL = 1e-9


def _uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _modality(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).Modality)


def _send(port: int, paths, deadline_s: float = 120.0) -> None:
    """storescu to Orthanc, one association per transfer syntax; resend while Orthanc is restarting."""
    for options, files in storescu_groups(paths):
        deadline = time.monotonic() + deadline_s
        while True:
            done = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "ORTHANC", *options, "127.0.0.1", str(port),
                                   *map(str, files)], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, done.stderr[-2000:]
            time.sleep(0.5)  # Orthanc is not back yet: a modality retries, so do we (duplicates are ignored)


def _wait(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _rows(out: Path) -> int:
    path = out / "results.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


@pytest.fixture(scope="module")
def run_dir(tiny_dicom_run):
    return tiny_dicom_run.run_dir


@pytest.fixture(scope="module")
def run_model(run_dir):
    return load_run(run_dir)


# --------------------------------------------------------------------------- DIMSE routing, restarts
def test_round_trip_survives_node_kill_and_orthanc_kill(run_dir, run_model, dicom_sample, tmp_path, monkeypatch):
    """storescu -> Orthanc -> (routed) node -> SR -> Orthanc, with the node killed (SIGKILL) mid-stream and
    Orthanc killed (SIGKILL) while the node catches up: every CR/DX image ends with exactly one SR in the
    archive that references it and carries its score, every study with one study SR; other modalities
    are not routed; the node scored each image once."""
    node_port = free_port()
    orthanc = LocalOrthanc(tmp_path / "orthanc", modalities={"salad": ("SALAD", "127.0.0.1", node_port)},
                           users={USER: PASSWORD}, dicomweb=False).start()
    out = tmp_path / "node"
    monkeypatch.setenv("SALAD_MED_ORTHANC_PASSWORD", PASSWORD)  # never on the command line
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    node = NodeProcess(serve_command(run_dir, out, node_port, orthanc, study_quiet=4, route_user=USER),
                       node_port, env, tmp_path / "node.log")
    real = sorted(dicom_sample.glob("*.dcm"))
    phantoms = write_dicom_tree(tmp_path / "phantoms", n=12, seed=21, size=(96, 96))  # 6 studies x 2 views
    ph = phantoms.source_path.tolist()
    try:
        node.start()
        _send(orthanc.dicom_port, real)  # 11 real CR/DX/OT files, 7 transfer syntaxes
        _wait(lambda: _rows(out) >= 2, 180, "the node to score its first images")
        node.stop(kill=True)  # mid-stream: the large JPEG 2000 images are still queued or in flight
        killed_rows = _rows(out)
        _send(orthanc.dicom_port, ph[:6])  # stored while the node is down: routed when it is back
        node.start()
        orthanc.restart(kill=True)  # Orthanc crashes while the node catches up and forwards
        _send(orthanc.dicom_port, ph[6:])
        images = [p for p in [*real, *ph] if _modality(p) in ("CR", "DX")]
        auth = HttpAuth(user=USER, password_env="SALAD_MED_ORTHANC_PASSWORD")

        def complete():
            inv = archive_inventory(orthanc.url, auth)
            counts = inv.srs_per_image()
            studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in images}
            covered = set(inv.study_srs.study_instance_uid)
            return inv if len(counts) == len(images) and (counts >= 1).all() and studies <= covered else None

        inv = _wait(complete, 240, "one SR per CR/DX image and one study SR per study in Orthanc", poll=2)
        time.sleep(2)  # anything sent twice would arrive now
        inv = archive_inventory(orthanc.url, auth)
    finally:
        node.stop()
        orthanc.stop()
    assert 2 <= killed_rows < len(real)  # the node really died mid-stream
    assert node.starts == 2
    # nothing lost, nothing twice: exactly one per-image SR per CR/DX image, in the archive
    counts = inv.srs_per_image()
    assert sorted(counts.index) == sorted(_uid(p) for p in images)
    assert (counts == 1).all(), counts[counts != 1]
    # the OT image (vlut_04) is stored but not routed: no SR
    ot = [_uid(p) for p in real if _modality(p) not in ("CR", "DX")]
    assert ot and not set(ot) & set(inv.image_srs.referenced_sop_instance_uid)
    # the node scored each image once (kill -9 included) and the archive's SR carries that score
    res = read_results(out / "results.csv")
    assert collections.Counter(res.sop_instance_uid) == collections.Counter(_uid(p) for p in images)
    assert (res.status == "ok").all(), res[res.status != "ok"][["sop_instance_uid", "reason"]]
    reference = run_model.score_paths(images).set_index("image_id")
    srs = inv.image_srs.set_index("referenced_sop_instance_uid")
    for p in images:
        uid = _uid(p)
        raw_ref = float(reference.loc[uid, "raw_score"])
        assert srs.loc[uid, "raw_score"] == pytest.approx(raw_ref, rel=RAW_REL)
        lo, hi = run_model.calibrate(np.array([raw_ref * (1 - RAW_REL), raw_ref * (1 + RAW_REL)]))
        assert lo - 1e-9 <= srs.loc[uid, "score"] <= hi + 1e-9
        assert srs.loc[uid, "study_instance_uid"] == str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
    # one study SR per study, referencing every image of the study with its per-image score
    by_study = collections.defaultdict(set)
    for p in images:
        by_study[str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)].add(_uid(p))
    assert collections.Counter(inv.study_srs.study_instance_uid) == collections.Counter(set(by_study))
    for row in inv.study_srs.itertuples(index=False):
        assert set(row.referenced) == by_study[row.study_instance_uid]
        assert row.aggregate == "max"
        assert row.score == pytest.approx(max(srs.loc[u, "score"] for u in row.referenced), rel=KEPT_REL)
        for u, s in row.image_scores.items():
            assert s == pytest.approx(srs.loc[u, "score"], rel=KEPT_REL, abs=1e-12)
    assert len(by_study) == 1 + 1 + 1 + 1 + 1 + 1 + 6  # RG2, RG3, 966, J2K 16 bit, NM, CR1 + 6 phantom studies


# --------------------------------------------------------------------------- Orthanc's Lua routing
def test_lua_routing_sends_cr_dx_and_gets_srs_back(run_model, tiny_dicom_run, tmp_path):
    """The simple set-up: Orthanc's Lua ``OnStoredInstance`` pushes CR/DX to the node (in-process here)."""
    node_port = free_port()
    orthanc = LocalOrthanc(tmp_path / "orthanc", modalities={"salad": ("SALAD", "127.0.0.1", node_port)},
                           dicomweb=False, lua_scripts=[lua_route_script("salad")])
    orthanc.start()
    settings = NodeSettings(output_dir=tmp_path / "node", allowed_aets=("ORTHANC",), host="127.0.0.1",
                            port=node_port, forward=ForwardTarget("127.0.0.1", orthanc.dicom_port, "ORTHANC"),
                            batch_size=4)
    node = ScoringNode(settings, run_model.score_paths).start()
    files = tiny_dicom_run.files.iloc[:4]
    try:
        _send(orthanc.dicom_port, files.source_path)
        inv = _wait(lambda: (lambda i: i if len(i.image_srs) >= 4 else None)(archive_inventory(orthanc.url)),
                    90, "4 SRs routed back by Lua")
    finally:
        node.stop(drain=False, timeout=10)
        orthanc.stop()
    assert sorted(inv.image_srs.referenced_sop_instance_uid) == sorted(files.sop_instance_uid)
    assert (inv.srs_per_image() == 1).all()


# --------------------------------------------------------------------------- load and faults (small)
def test_concurrent_associations_with_node_killed_midway(run_dir, tmp_path):
    """A smaller ``python -m benchmarks pacs_roundtrip``: 5 concurrent associations x 8 images through
    Orthanc -> node -> Orthanc, the node SIGKILLed once 40 % are scored: each image exactly one SR."""
    res = run_roundtrip(run_dir, tmp_path, senders=5, per_sender=8, size=64, kill_at=0.4, timeout=300,
                        log=lambda *_: None)
    assert res["acked_by_orthanc"] == 40
    assert res["node_starts"] == 2 and res["killed_after_s"] is not None
    assert res["lost"] == 0 and res["duplicates"] == 0, res
    assert res["sr_in_archive"] == 40
    results = read_results(tmp_path / "node" / "results.csv")
    assert results.sop_instance_uid.is_unique and len(results) == 40  # scored once each, across the kill


# --------------------------------------------------------------------------- router: bad configuration
def test_router_refuses_unknown_modality_and_bad_credentials(run_model, tmp_path, monkeypatch):
    from salad_med.errors import SaladMedError

    orthanc = LocalOrthanc(tmp_path / "orthanc", modalities={"other": ("OTHER", "127.0.0.1", 1)},
                           users={USER: PASSWORD}, dicomweb=False).start()
    node = ScoringNode(NodeSettings(output_dir=tmp_path / "node", allowed_aets=("ORTHANC",), port=0), run_model.score_paths)
    try:
        monkeypatch.setenv("SALAD_MED_ORTHANC_PASSWORD", PASSWORD)
        good = HttpAuth(user=USER, password_env="SALAD_MED_ORTHANC_PASSWORD")
        with pytest.raises(SaladMedError, match="no modality 'salad'.*other"):
            OrthancRouter(orthanc.url, "salad", node, good).check()
        monkeypatch.setenv("WRONG_PW", "nope")
        with pytest.raises(SaladMedError, match="HTTP 401"):
            OrthancRouter(orthanc.url, "other", node, HttpAuth(user=USER, password_env="WRONG_PW")).check()
        OrthancRouter(orthanc.url, "other", node, good).check()  # control: right modality and password
    finally:
        orthanc.stop()
    with pytest.raises(OrthancUnreachable, match="cannot reach"):
        OrthancRouter(orthanc.url, "other", node, good).check()  # Orthanc stopped


def test_serve_route_from_needs_the_password_in_the_environment(run_dir, tmp_path):
    from typer.testing import CliRunner

    from salad_med.cli.app import app

    env = {k: v for k, v in os.environ.items() if k != "SALAD_MED_ORTHANC_PASSWORD"}
    result = CliRunner(env=env).invoke(app, ["serve", "--run", str(run_dir), "--output", str(tmp_path / "n"),
                                             "--allow", "ORTHANC", "--port", "0", "--route-from", "http://127.0.0.1:9",
                                             "--route-user", USER])
    assert result.exit_code == 2
    assert "SALAD_MED_ORTHANC_PASSWORD" in result.output and "never taken on the command line" in result.output
    assert not (tmp_path / "n" / "results.csv").exists()
