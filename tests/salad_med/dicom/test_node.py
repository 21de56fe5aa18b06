"""The DICOM scoring node: pynetdicom in-process checks, then end-to-end against dcmtk's tools."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from salad_med.dicom.node import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    ForwardTarget,
    NodeSettings,
    ScoringNode,
    _validate_image,
    iter_audit,
    read_results,
)
from salad_med.dicom.orthanc import free_port
from salad_med.dicom.sr import build_score_sr, read_score_sr
from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run

#: dcmtk's tools, never pynetdicom's same-named venv scripts (they reject -xv, +II, ... and print other messages)
STORESCU, ECHOSCU, DSRDUMP, STORESCP = (dcmtk_tool(t) for t in ("storescu", "echoscu", "dsrdump", "storescp"))
needs_dcmtk = pytest.mark.skipif(
    not (STORESCU and ECHOSCU and DSRDUMP and STORESCP),
    reason="; ".join(dcmtk_missing_reason(t) for t in ("storescu", "echoscu", "dsrdump", "storescp")
                   if not dcmtk_tool(t)))
#: storescu option proposing a file's (compressed) transfer syntax; uncompressed ones need none.
STORESCU_TS = {"1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
               "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.51": "-xx",
               "1.2.840.10008.1.2.4.50": "-xy"}
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def run_model(tiny_dicom_run):
    return load_run(tiny_dicom_run.run_dir)


@pytest.fixture(scope="module")
def phantoms(tiny_dicom_run):
    """Six phantom files (CR/DX, MONOCHROME1/2, three transfer syntaxes) and their UIDs."""
    return tiny_dicom_run.files.iloc[:6].reset_index(drop=True)


@pytest.fixture
def make_node(tmp_path, run_model):
    nodes = []

    def _make(out: Path | None = None, score_fn=None, **kwargs) -> ScoringNode:
        kwargs = {"allowed_aets": ("TESTSCU", "PACS"), "host": "127.0.0.1", "port": 0, "batch_size": 4,
                  **kwargs}
        node = ScoringNode(NodeSettings(output_dir=out or tmp_path / "node", **kwargs),
                           score_fn or run_model.score_paths).start()
        nodes.append(node)
        return node

    yield _make
    for node in nodes:
        node.stop(drain=False, timeout=10)


def _scu(*contexts) -> AE:
    """An SCU proposing one presentation context per (SOP class, transfer syntax)."""
    ae = AE(ae_title="TESTSCU")
    for ctx in contexts or (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation):
        for syntax in SYNTAXES:
            ae.add_requested_context(ctx, syntax)
    return ae


def _send(port: int, items, aet: str = "TESTSCU") -> list[int]:
    """C-STORE datasets or file paths with pynetdicom; the statuses."""
    ae = _scu()
    ae.ae_title = aet
    assoc = ae.associate("127.0.0.1", port, ae_title="SALAD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def _storescu(port: int, paths, aet: str = "TESTSCU", *options: str, timeout: float = 120):
    return subprocess.run([STORESCU, "-aet", aet, "-aec", "SALAD", *options, "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=timeout)


def _storescu_by_syntax(port: int, paths) -> list[subprocess.CompletedProcess]:
    """One storescu per transfer syntax, proposing that syntax (as a PACS would)."""
    groups = collections.defaultdict(list)
    for p in paths:
        groups[str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)].append(p)
    return [_storescu(port, group, "TESTSCU", *([STORESCU_TS[ts]] if ts in STORESCU_TS else []))
            for ts, group in groups.items()]


def _uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _events(node_or_dir) -> list[dict]:
    root = node_or_dir.settings.output_dir if isinstance(node_or_dir, ScoringNode) else Path(node_or_dir)
    path = root / "audit.jsonl"
    return list(iter_audit(path)) if path.exists() else []


def _assert_scored_once(node: ScoringNode, uids, run_model=None, paths=None) -> None:
    res = node.results()
    assert collections.Counter(res.sop_instance_uid) == collections.Counter(set(uids)), "each instance once"
    assert (res.status == "ok").all(), res[res.status != "ok"][["sop_instance_uid", "reason"]]
    for uid in uids:
        report = read_score_sr(node.dirs["sr"] / f"{uid}.dcm")
        assert report.referenced_sop_instance_uid == uid
        # results.csv keeps 6 significant digits of the calibrated score
        assert report.score == pytest.approx(float(res.set_index("sop_instance_uid").score[uid]), rel=1e-5, abs=1e-6)
        assert (node.dirs["done"] / f"{uid}.dcm").is_file()
    assert not any(node.dirs["incoming"].iterdir())
    scored = collections.Counter(e["sop_instance_uid"] for e in _events(node) if e["event"] == "scored")
    assert scored == collections.Counter(set(uids))
    if run_model is not None:  # the node scores exactly like `salad-med score`
        ref = run_model.score_paths(paths)
        got = res.set_index("sop_instance_uid").loc[[_uid(p) for p in paths]]
        # the node batches images differently from score_paths: raw scores agree to float32 rounding of the
        # encoder (measured ~2e-7 relative); results.csv keeps 10 significant digits of them
        np.testing.assert_allclose(got.raw_score.to_numpy(float), ref.raw_score.to_numpy(float), rtol=1e-5)


# --------------------------------------------------------------------------- settings and validation
def test_forward_target_parse():
    assert ForwardTarget.parse("pacs.local:104:ARCHIVE") == ForwardTarget("pacs.local", 104, "ARCHIVE")
    for bad in ("host:104", "host:port:AE", "host:0:AE", "host:70000:AE", "::"):
        with pytest.raises(ConfigError):
            ForwardTarget.parse(bad)


def test_settings_validation(tmp_path):
    with pytest.raises(ConfigError, match="--allow"):
        NodeSettings(output_dir=tmp_path, allowed_aets=())
    with pytest.raises(ConfigError, match="16"):
        NodeSettings(output_dir=tmp_path, allowed_aets=("A" * 17,))
    with pytest.raises(ConfigError, match="workers"):
        NodeSettings(output_dir=tmp_path, allowed_aets=("PACS",), workers=0)


def test_validate_image(phantoms):
    ds = pydicom.dcmread(phantoms.source_path[0])  # explicit little endian, native pixels
    assert _validate_image(ds) is None
    short = pydicom.dcmread(phantoms.source_path[0])
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    assert "truncated" in _validate_image(short)
    del short.PixelData
    assert "missing PixelData" in _validate_image(short)
    rle = pydicom.dcmread(phantoms.source_path[2])
    assert rle.file_meta.TransferSyntaxUID == RLELossless and _validate_image(rle) is None


def test_validate_encapsulated_image(dicom_sample):
    j2k = pydicom.dcmread(dicom_sample / "RG3_J2KI.dcm")
    assert _validate_image(j2k) is None
    j2k.PixelData = j2k.PixelData[:8]  # an item tag and a few bytes of the offset table
    assert _validate_image(j2k) is not None


# --------------------------------------------------------------------------- in-process (pynetdicom SCU)
def test_store_scores_once_writes_sr_and_audit_without_phi(make_node, phantoms, run_model, caplog):
    node = make_node()
    paths = list(phantoms.source_path[:4])
    datasets = [pydicom.dcmread(p) for p in paths]
    names = {str(ds.PatientName) for ds in datasets}
    with caplog.at_level("DEBUG"):
        assert _send(node.port, datasets) == [0, 0, 0, 0]
        assert node.wait_idle(60)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    _assert_scored_once(node, uids, run_model, paths)
    res = node.results()
    assert set(res.calling_ae) == {"TESTSCU"}
    assert (res.latency_s >= 0).all()
    sr = pydicom.dcmread(node.dirs["sr"] / f"{uids[0]}.dcm")
    assert sr.StudyInstanceUID == datasets[0].StudyInstanceUID and sr.Modality == "SR"
    stored = [e for e in _events(node) if e["event"] == "store"]
    assert [(e["sop_instance_uid"], e["calling_ae"], e["status"]) for e in stored] == \
        [(u, "TESTSCU", "queued") for u in uids]
    text = (node.audit_path.read_text() + node.results_path.read_text() + caplog.text)
    for name in names:
        for part in filter(None, name.split("^")):
            assert part not in text, "a patient name reached a log"


def test_duplicate_and_malformed_instances(make_node, phantoms, tmp_path, monkeypatch):
    import pynetdicom._config

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # send files undecoded
    node = make_node()
    good = phantoms.source_path[1]
    assert _send(node.port, [pydicom.dcmread(good)]) == [0]
    assert node.wait_idle(60)
    # a byte-truncated file (pynetdicom sends the raw bytes of a path without decoding them)
    raw = Path(phantoms.source_path[2]).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - 3000])
    # pixel data shorter than Rows x Columns (well-formed encoding, incomplete image)
    short = pydicom.dcmread(phantoms.source_path[3])
    short.PixelData = short.PixelData[:100]
    statuses = _send(node.port, [cut, short, pydicom.dcmread(good), pydicom.dcmread(phantoms.source_path[4])])
    assert statuses[0] in (STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH)
    assert statuses[1] == STATUS_DATASET_MISMATCH
    assert statuses[2:] == [0, 0]  # the duplicate is acknowledged, the node keeps serving
    assert node.wait_idle(60)
    _assert_scored_once(node, [_uid(good), _uid(phantoms.source_path[4])])
    refused = [e for e in _events(node) if e["status"] == "refused"]
    assert len(refused) == 2 and "truncated" in refused[1]["reason"]
    assert [e["status"] for e in _events(node) if e["event"] == "store"].count("duplicate") == 1
    assert sorted(p.name for p in node.dirs["incoming"].iterdir()) == []


def test_resend_racing_the_commit_is_not_scored_twice(make_node, phantoms, monkeypatch):
    """A resend (an archive retrying after a crash) that passes the "already scored?" look-up just before a
    worker commits the instance's row, and is persisted just after, is still acknowledged as a duplicate and
    not queued again: the look-up and the claim of the instance are one step under the node's lock (found as a
    twice-scored instance in the Orthanc kill test). The race is forced by making the look-up miss."""
    node = make_node()
    good = phantoms.source_path[1]
    assert _send(node.port, [pydicom.dcmread(good)]) == [0]
    assert node.wait_idle(60)
    monkeypatch.setattr(node, "is_scored", lambda uid: False)  # the look-up ran before the commit
    assert _send(node.port, [pydicom.dcmread(good)]) == [0]
    assert node.wait_idle(60)
    _assert_scored_once(node, [_uid(good)])
    assert [e["status"] for e in _events(node) if e["event"] == "store"].count("duplicate") == 1


def test_non_image_sop_class_refused_at_negotiation(make_node, tmp_path, phantoms):
    node = make_node()
    ae = _scu(ComprehensiveSRStorage, ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SALAD")
    assert assoc.is_established  # the association is fine, the SR contexts are not
    rejected = {(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts}
    assert rejected == {(ComprehensiveSRStorage, 0x03)}  # abstract syntax not supported
    with pytest.raises(ValueError, match="presentation context"):
        assoc.send_c_store(build_score_sr(phantoms.source_path[0], 0.5))
    assoc.release()
    assert not any(node.dirs["incoming"].iterdir())


def test_scoring_failure_is_recorded_not_lost(make_node, phantoms):
    node = make_node()
    rgb = pydicom.dcmread(phantoms.source_path[0])
    assert rgb.BitsAllocated == 8
    gray = rgb.pixel_array.astype(np.uint8)
    rgb.SOPClassUID = SecondaryCaptureImageStorage
    rgb.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    rgb.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rgb.SOPInstanceUID = rgb.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit = 7
    rgb.PixelData = np.stack([gray, gray // 2, gray // 3], axis=-1).tobytes()
    ae = _scu(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SALAD")
    assert int(assoc.send_c_store(rgb).Status) == 0  # received and persisted...
    assoc.release()
    assert node.wait_idle(60)
    res = node.results()
    assert list(res.status) == ["failed"] and res.reason[0]  # ...then recorded as a scoring failure
    assert (node.dirs["failed"] / f"{rgb.SOPInstanceUID}.dcm").is_file()
    assert not any(node.dirs["sr"].iterdir())
    assert [e["event"] for e in _events(node) if e["sop_instance_uid"]] == ["store", "score_failed"]


def test_restart_picks_up_received_but_unscored(tmp_path, make_node, phantoms, run_model):
    out = tmp_path / "node"
    incoming = out / "incoming"
    incoming.mkdir(parents=True)
    uids = [_uid(p) for p in phantoms.source_path[:3]]
    for uid, path in zip(uids, phantoms.source_path[:3], strict=True):
        shutil.copy(path, incoming / f"{uid}.dcm")
        (incoming / f"{uid}.json").write_text(json.dumps({"calling_ae": "PACS", "received_at": time.time()}))
    # a kill during the atomic write of uids[0]'s second copy left its temp file (a full copy of the image,
    # named like a DICOM file): it is not an instance and must not be scored as one (it used to be: a
    # second SR for the same image reached the archive in the Orthanc round trip)
    shutil.copy(phantoms.source_path[0], incoming / f".{uids[0]}.j0032ys7.dcm")
    # uids[2] crashed after its results row was written but before the move: it must not be rescored
    (out / "results.csv").write_text("sop_instance_uid,study_instance_uid,calling_ae,received_at,scored_at,"
                                     "latency_s,score,raw_score,status,reason,image_path,sr_path\n"
                                     f"{uids[2]},,PACS,0,0,0,0.5,0.1,ok,,done/{uids[2]}.dcm,\n")
    node = make_node(out)
    assert node.wait_idle(60)
    res = node.results()
    assert collections.Counter(res.sop_instance_uid) == collections.Counter(uids)
    assert set(res.calling_ae) == {"PACS"}
    assert sorted(p.name for p in node.dirs["done"].iterdir()) == sorted(f"{u}.dcm" for u in uids)
    assert not any(incoming.iterdir())
    assert [e for e in _events(node) if e["event"] == "recovered"][0]["requeued"] == 2


def _storage_scp(received: list, port: int = 0):
    """A pynetdicom Storage SCP accepting Comprehensive SR; appends received datasets to ``received``."""
    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(ComprehensiveSRStorage, SYNTAXES[:2])
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def test_forward_failures_are_kept_and_retried_at_restart(tmp_path, make_node, phantoms):
    out = tmp_path / "node"
    dead = ForwardTarget("127.0.0.1", free_port(), "ARCHIVE")  # nobody listens there
    node = make_node(out, forward=dead, forward_retries=1, forward_backoff_s=0.01)
    datasets = [pydicom.dcmread(p) for p in phantoms.source_path[:2]]
    assert _send(node.port, datasets) == [0, 0]
    assert node.wait_idle(60)
    node.stop()
    uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert sorted(p.stem for p in node.dirs["forward_failed"].iterdir()) == uids
    failed = [e for e in _events(out) if e["event"] == "forward_failed"]
    assert sorted(e["sop_instance_uid"] for e in failed) == uids and "association" in failed[0]["reason"]
    received: list = []
    server = _storage_scp(received)
    try:
        node2 = make_node(out, forward=ForwardTarget("127.0.0.1", server.server_address[1], "ARCHIVE"))
        assert node2.wait_idle(60)
    finally:
        server.shutdown()
    assert sorted(read_score_sr(ds).referenced_sop_instance_uid for ds in received) == uids
    assert not any(node2.dirs["forward_failed"].iterdir()) and not any(node2.dirs["outbox"].iterdir())
    assert len(node2.results()) == 2  # nothing rescored
    assert sorted(p.stem for p in node2.dirs["sr"].iterdir()) == uids


# --------------------------------------------------------------------------- end to end with dcmtk
@needs_dcmtk
@pytest.mark.dcmtk
def test_echoscu_and_unknown_ae(make_node):
    node = make_node()
    ok = subprocess.run([ECHOSCU, "-aet", "PACS", "-aec", "SALAD", "127.0.0.1", str(node.port)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([ECHOSCU, "-aet", "INTRUDER", "-aec", "SALAD", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stderr
    rejected = [e for e in _events(node) if e["event"] == "association_rejected"]
    assert [(e["calling_ae"], e["status"]) for e in rejected] == [("INTRUDER", "rejected")]


@needs_dcmtk
@pytest.mark.dcmtk
def test_storescu_phantoms_scored_exactly_once(make_node, phantoms, run_model, tmp_path):
    node = make_node()
    paths = list(phantoms.source_path)
    assert {str(t) for t in phantoms.transfer_syntax} >= {"explicit little endian", "rle lossless"}
    for proc in _storescu_by_syntax(node.port, paths):
        assert proc.returncode == 0, proc.stderr
    unknown = _storescu(node.port, paths[:1], "INTRUDER")
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
    # a non-image SOP class (an SR) is refused: no presentation context is accepted for it
    sr_file = node.dirs["sr"].parent / "not_an_image.dcm"
    assert node.wait_idle(60)
    shutil.copy(next(node.dirs["sr"].iterdir()), sr_file)
    refused = _storescu(node.port, [sr_file], "TESTSCU", "-R")
    assert refused.returncode != 0 and "No Acceptable Presentation Contexts" in refused.stderr
    _assert_scored_once(node, [_uid(p) for p in paths], run_model, paths)
    # dsrdump parses what the node wrote
    dump = subprocess.run([DSRDUMP, str(next(node.dirs["sr"].iterdir()))], capture_output=True, timeout=30)
    assert dump.returncode == 0 and b"SALAD anomaly score" in dump.stdout


@needs_dcmtk
@pytest.mark.dcmtk
def test_storescu_real_sample_scored_exactly_once(make_node, dicom_sample):
    node = make_node(workers=2)
    paths = sorted(dicom_sample.glob("*.dcm"))
    for proc in _storescu_by_syntax(node.port, paths):
        assert proc.returncode == 0, proc.stderr
    assert node.wait_idle(120)
    res = node.results()
    uids = [_uid(p) for p in paths]
    assert collections.Counter(res.sop_instance_uid) == collections.Counter(uids)  # each exactly once
    ok = res[res.status == "ok"]
    assert len(ok) >= len(paths) - 2, res[res.status != "ok"][["sop_instance_uid", "reason"]]
    assert sorted(p.stem for p in node.dirs["sr"].iterdir()) == sorted(ok.sop_instance_uid)


@needs_dcmtk
@pytest.mark.dcmtk
def test_twenty_concurrent_associations(make_node, phantoms):
    node = make_node(workers=2, batch_size=16)
    paths = [p for p, ts in zip(phantoms.source_path, phantoms.transfer_syntax, strict=True)
             if ts != "rle lossless"][:4]
    files = (paths * 3)[:10]  # 10 images per association; +II gives each sent image a new SOP Instance UID
    procs = [subprocess.Popen([STORESCU, "-aet", "TESTSCU", "-aec", "SALAD", "+II", "127.0.0.1",
                               str(node.port), *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(20)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert node.wait_idle(120)
    res = node.results()
    assert len(res) == 200 and res.sop_instance_uid.nunique() == 200 and (res.status == "ok").all()
    assert len(list(node.dirs["sr"].iterdir())) == 200
    stored = [e for e in _events(node) if e["event"] == "store"]
    assert len(stored) == 200 and {e["status"] for e in stored} == {"queued"}


@needs_dcmtk
@pytest.mark.dcmtk
def test_truncated_file_answered_with_failure(make_node, phantoms, tmp_path):
    node = make_node()
    ds = pydicom.dcmread(phantoms.source_path[0])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a file cut inside its pixel data, header fixed
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut, enforce_file_format=True)
    proc = _storescu(node.port, [cut, phantoms.source_path[1]], "TESTSCU", "-nh", "-v")
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stderr, proc.stderr
    assert proc.stderr.count("Received Store Response (Success)") == 1
    echo = subprocess.run([ECHOSCU, "-aet", "PACS", "-aec", "SALAD", "127.0.0.1", str(node.port)],
                          capture_output=True, timeout=30)
    assert echo.returncode == 0  # still serving
    assert node.wait_idle(60)
    _assert_scored_once(node, [_uid(phantoms.source_path[1])])


@needs_dcmtk
@pytest.mark.dcmtk
def test_forward_to_dcmtk_storescp(make_node, phantoms, tmp_path):
    port = free_port()
    received = tmp_path / "archive"
    received.mkdir()
    scp = subprocess.Popen([STORESCP, "-aet", "ARCHIVE", "-od", str(received), "+xa", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        node = make_node(forward=ForwardTarget("127.0.0.1", port, "ARCHIVE"))
        paths = list(phantoms.source_path[:3])
        assert _send(node.port, [pydicom.dcmread(p) for p in paths]) == [0, 0, 0]
        assert node.wait_idle(60)
    finally:
        scp.terminate()
        scp.wait(10)
    files = sorted(received.iterdir())
    assert len(files) == 3
    refs = sorted(read_score_sr(f).referenced_sop_instance_uid for f in files)
    assert refs == sorted(_uid(p) for p in paths)
    for f in files:
        dump = subprocess.run([DSRDUMP, str(f)], capture_output=True, timeout=30)
        assert dump.returncode == 0 and b"SALAD anomaly score" in dump.stdout
    assert [e["event"] for e in _events(node)].count("forwarded") == 3


@needs_dcmtk
@pytest.mark.dcmtk
def test_serve_cli_crash_restart_and_sigterm_drain(tiny_dicom_run, phantoms, tmp_path):
    """``salad-med serve``: SIGKILL mid-stream, restart, SIGTERM drains; every image scored once."""
    out = tmp_path / "node"
    port = free_port()
    cmd = [sys.executable, "-m", "salad_med", "-q", "serve", "--run", str(tiny_dicom_run.run_dir), "--output",
           str(out), "--allow", "TESTSCU", "--host", "127.0.0.1", "--port", str(port), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            echo = subprocess.run([ECHOSCU, "-aet", "TESTSCU", "-aec", "SALAD", "127.0.0.1", str(port)],
                                  capture_output=True, timeout=30)
            if echo.returncode == 0:
                return proc
            time.sleep(0.3)
        proc.kill()
        pytest.fail("salad-med serve did not start")

    paths = [p for p, ts in zip(tiny_dicom_run.files.source_path, tiny_dicom_run.files.transfer_syntax,
                                strict=True) if ts != "rle lossless"]
    first, second = paths[:8], paths[8:12]
    proc = start()
    assert _storescu(port, first).returncode == 0
    proc.send_signal(signal.SIGKILL)  # crash: whatever was not scored stays in incoming/
    proc.wait(30)
    proc = start()  # picks up incoming/
    assert _storescu(port, second).returncode == 0
    proc.send_signal(signal.SIGTERM)  # graceful: drain the queue, then exit 0
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    res = read_results(out / "results.csv")
    uids = [_uid(p) for p in first + second]
    assert collections.Counter(res.sop_instance_uid) == collections.Counter(uids)
    assert (res.status == "ok").all()
    assert not list((out / "incoming").iterdir())
    assert [e["event"] for e in _events(out)].count("node_stopped") == 1  # the SIGKILLed run never stopped


def test_serve_cli_argument_errors(tmp_path, tiny_dicom_run):
    from typer.testing import CliRunner

    from salad_med.cli.app import app

    base = ["serve", "--run", str(tiny_dicom_run.run_dir), "--output", str(tmp_path / "n"), "--port", "0"]
    bad_forward = CliRunner().invoke(app, [*base, "--allow", "PACS", "--forward", "pacs:104"])
    assert bad_forward.exit_code == 2 and "HOST:PORT:AE" in bad_forward.output
    long_ae = CliRunner().invoke(app, [*base, "--allow", "A_VERY_LONG_AE_TITLE"])
    assert long_ae.exit_code == 2 and "16" in long_ae.output
    no_run = CliRunner().invoke(app, ["serve", "--run", str(tmp_path / "missing"), "--output", str(tmp_path / "n"),
                                      "--allow", "PACS", "--port", "0"])
    assert no_run.exit_code == 1 and "not found" in no_run.output
    assert not (tmp_path / "n" / "results.csv").exists()


def test_node_threads_do_not_leak_and_busy_port_is_reported(make_node, tmp_path, run_model):
    from salad_med.errors import SaladMedError

    before = threading.active_count()
    node = make_node()
    busy = ScoringNode(NodeSettings(output_dir=tmp_path / "other", allowed_aets=("PACS",), host="127.0.0.1",
                                    port=node.port), run_model.score_paths)
    with pytest.raises(SaladMedError, match=f"cannot listen on 127.0.0.1:{node.port}"):
        busy.start()
    node.stop()
    time.sleep(0.2)
    assert threading.active_count() <= before + 1


# ------------------------------------------------------------- called AE title (no trained run needed)
def _never_scores(paths):
    msg = "nothing should be scored"
    raise AssertionError(msg)


def test_association_to_another_called_ae_title_is_rejected_and_audited(tmp_path):
    settings = NodeSettings(output_dir=tmp_path / "node", allowed_aets=("TESTSCU",), ae_title="SALAD",
                            host="127.0.0.1", port=0)
    node = ScoringNode(settings, _never_scores).start()
    try:
        wrong = _scu().associate("127.0.0.1", node.port, ae_title="OTHERNODE")
        assert wrong.is_rejected and not wrong.is_established
        right = _scu().associate("127.0.0.1", node.port, ae_title="SALAD")  # control: same SCU, our title
        assert right.is_established
        right.release()
    finally:
        node.stop(drain=False, timeout=10)
    rejected = [e for e in _events(node) if e["event"] == "association_rejected"]
    assert len(rejected) == 1
    record = rejected[0]
    assert (record["calling_ae"], record["called_ae"], record["status"]) == ("TESTSCU", "OTHERNODE", "rejected")
    assert "OTHERNODE" in record["reason"] and "SALAD" in record["reason"]
    assert set(record) <= {"time", "event", "sop_instance_uid", "calling_ae", "called_ae", "status", "score",
                           "reason", "address"}  # AE titles and the address only: no patient data
