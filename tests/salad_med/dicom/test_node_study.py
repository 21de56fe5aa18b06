"""The node's study SRs (``study_quiet_s``) and its crash-safe SR outbox, in process (pynetdicom both ends)."""

from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from salad_med.dicom.node import ForwardTarget, NodeSettings, ScoringNode, read_results
from salad_med.dicom.sr import read_score_sr, write_score_sr
from salad_med.dicom.study import is_study_sr, read_study_sr
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run


@pytest.fixture(scope="module")
def run_model(tiny_dicom_run):
    return load_run(tiny_dicom_run.run_dir)


@pytest.fixture(scope="module")
def files(tiny_dicom_run):
    """Three studies: two of two views and one of one (write_dicom_tree pairs images 2k, 2k+1)."""
    return tiny_dicom_run.files.iloc[:5].reset_index(drop=True)


class Archive:
    """A pynetdicom Storage SCP standing for the PACS the node forwards to; keeps what it receives."""

    def __init__(self, port: int = 0):
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="ARCHIVE")
        ae.add_supported_context(ComprehensiveSRStorage)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def image_srs(self):
        return [read_score_sr(ds) for ds in self.received if not is_study_sr(ds)]

    def study_srs(self):
        return [read_study_sr(ds) for ds in self.received if is_study_sr(ds)]

    def close(self):
        self.server.shutdown()


@pytest.fixture
def archive():
    a = Archive()
    yield a
    a.close()


def _send(port: int, paths) -> None:
    ae = AE(ae_title="PACS")
    for ctx in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation):
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless):
            ae.add_requested_context(ctx, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="SALAD")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(str(p)).Status) for p in paths] == [0] * len(paths)
    finally:
        assoc.release()


def _node(out: Path, run_model, archive: Archive | int, **kwargs) -> ScoringNode:
    port = archive if isinstance(archive, int) else archive.port
    settings = NodeSettings(output_dir=out, allowed_aets=("PACS",), host="127.0.0.1", port=0, batch_size=4,
                            forward=ForwardTarget("127.0.0.1", port, "ARCHIVE"), forward_backoff_s=0.1,
                            **kwargs)
    return ScoringNode(settings, run_model.score_paths).start()


def _wait(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_study_sr_once_a_study_is_quiet_and_a_new_version_for_a_late_image(tmp_path, run_model, archive, files):
    node = _node(tmp_path / "node", run_model, archive, study_quiet_s=1.0)
    try:
        _send(node.port, files.source_path[:4])  # studies A (0, 1) and B (2, 3)
        assert _wait(lambda: len(archive.study_srs()) == 2)
        t_first = time.time()
        studies = {r.study_instance_uid: r for r in archive.study_srs()}
        images = {r.referenced_sop_instance_uid: r for r in archive.image_srs()}
        assert len(images) == 4
        for uid, report in studies.items():
            expected = set(files[files.study_instance_uid == uid].sop_instance_uid)
            assert set(report.study_referenced_uids) == set(report.images) == expected
            assert report.aggregate == "max"
            # the study SR carries each image's score (kept to 10 significant digits by the node)
            for img, entry in report.images.items():
                assert entry.score == pytest.approx(images[img].score, rel=1e-9, abs=1e-12)
            assert report.score == pytest.approx(max(images[i].score for i in expected), rel=1e-9, abs=1e-12)
        # quiet means quiet: nothing more is emitted while nothing arrives
        time.sleep(1.5)
        assert len(archive.study_srs()) == 2
        # a late image of study C: its own study SR; then a late view of study A: a second version of A
        _send(node.port, files.source_path[4:5])
        late_a = tmp_path / "late.dcm"
        ds = pydicom.dcmread(files.source_path[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(late_a, enforce_file_format=True)
        _send(node.port, [late_a])
        assert _wait(lambda: len(archive.study_srs()) == 4)
    finally:
        node.stop()
    assert time.time() - t_first >= 1.0
    by_study = collections.defaultdict(list)
    for ds in archive.received:
        if is_study_sr(ds):
            by_study[str(ds.StudyInstanceUID)].append(ds)
    study_a = files.study_instance_uid[0]
    first, second = by_study[study_a]
    assert len(read_study_sr(second).images) == 3
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    log = [line.split(",") for line in (tmp_path / "node" / "studies.csv").read_text().splitlines()[1:]]
    assert len(log) == 4 and sorted(int(r[2]) for r in log) == [1, 2, 2, 3]


def test_study_sr_due_after_restart_and_not_while_held(tmp_path, run_model, archive, files):
    out = tmp_path / "node"
    node = _node(out, run_model, archive)  # study SRs off
    _send(node.port, files.source_path[:2])
    assert node.wait_idle(60)
    node.stop()
    assert archive.study_srs() == []
    node = _node(out, run_model, archive, study_quiet_s=0.5)  # restarted with study SRs on
    held = {"on": True}
    node.study_hold = lambda: held["on"]  # e.g. a router still catching up: not quiet yet
    try:
        time.sleep(1.2)
        assert archive.study_srs() == [] and node.studies_due() == []
        held["on"] = False
        assert _wait(lambda: len(archive.study_srs()) == 1, 30)
    finally:
        node.stop()
    assert set(archive.study_srs()[0].images) == set(files.sop_instance_uid[:2])


def test_uncommitted_outbox_sr_is_dropped_and_committed_ones_are_sent(tmp_path, run_model, archive, files):
    """A kill between linking an SR into the outbox and committing its results row: the stale SR is never
    sent, the image is scored again and exactly one SR per image reaches the archive."""
    out = tmp_path / "node"
    src = files.source_path[0]
    uid = files.sop_instance_uid[0]
    for name in ("incoming", "outbox"):
        (out / name).mkdir(parents=True)
    shutil.copy(src, out / "incoming" / f"{uid}.dcm")  # received, not scored
    (out / "incoming" / f"{uid}.json").write_text(json.dumps({"calling_ae": "PACS", "received_at": time.time()}))
    stale = write_score_sr(src, 0.123, out / "outbox" / f"{uid}.dcm")  # linked, never committed
    stale_uid = str(pydicom.dcmread(stale).SOPInstanceUID)
    node = _node(out, run_model, archive)
    try:
        assert _wait(lambda: len(archive.received) == 1, 60)
        assert node.wait_idle(30)
    finally:
        node.stop()
    (report,) = archive.image_srs()
    assert report.referenced_sop_instance_uid == uid and report.sop_instance_uid != stale_uid
    assert report.sop_instance_uid == str(pydicom.dcmread(out / "sr" / f"{uid}.dcm").SOPInstanceUID)
    assert list(read_results(out / "results.csv").sop_instance_uid) == [uid]
    assert not list((out / "outbox").iterdir())


def test_resend_of_a_scored_instance_is_acknowledged_not_rescored(tmp_path, run_model, archive, files):
    out = tmp_path / "node"
    node = _node(out, run_model, archive)
    try:
        _send(node.port, files.source_path[:2])
        assert node.wait_idle(60)
        (out / "done" / f"{files.sop_instance_uid[0]}.dcm").unlink()  # scored is known without the file
        assert node.is_scored(files.sop_instance_uid[0]) and node.is_known(files.sop_instance_uid[1])
        _send(node.port, files.source_path[:2])
        assert node.wait_idle(60)
    finally:
        node.stop()
    assert len(read_results(out / "results.csv")) == 2 and len(archive.received) == 2


def test_study_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="study_aggregate"):
        NodeSettings(output_dir=tmp_path, allowed_aets=("PACS",), study_aggregate="median")
    with pytest.raises(ConfigError, match="study_quiet_s"):
        NodeSettings(output_dir=tmp_path, allowed_aets=("PACS",), study_quiet_s=-1)


def test_srs_that_failed_to_forward_are_sent_once_the_archive_is_back(tmp_path, run_model, files):
    """The archive down for longer than the retries: the SR waits in forward_failed/ and is swept back into
    the outbox every forward_sweep_s, without a node restart."""
    from salad_med.dicom.orthanc import free_port

    port = free_port()
    node = _node(tmp_path / "node", run_model, port, forward_retries=0, forward_sweep_s=0.5)
    archive = None
    try:
        _send(node.port, files.source_path[:1])
        assert _wait(lambda: len(list((tmp_path / "node" / "forward_failed").glob("*.dcm"))) == 1, 60)
        archive = Archive(port)
        assert _wait(lambda: len(archive.received) == 1, 30)
        time.sleep(1.2)  # two more sweeps: nothing is sent twice
    finally:
        node.stop()
        if archive is not None:
            archive.close()
    assert [r.referenced_sop_instance_uid for r in archive.image_srs()] == [files.sop_instance_uid[0]]
    assert not list((tmp_path / "node" / "forward_failed").iterdir())
