"""PACS round trip under load and faults: ``python -m benchmarks pacs_roundtrip``.

Everything on loopback, as a hospital would run it: ``--senders`` concurrent dcmtk ``storescu``
associations send ``--per-sender`` phantom radiographs each to a local **Orthanc**; the scoring node
(``salad-med serve --route-from`` Orthanc's REST API, ``--forward`` to Orthanc's DICOM port) receives them
through Orthanc's ``/modalities/{id}/store`` and sends one SR per image back. Two runs side by side:

* ``steady``: nothing goes wrong;
* ``node killed``: the node is killed (SIGKILL) once ``--kill-at`` of the images are scored, and
  restarted at once.

Figures per run: images/s (images / (first send -> last SR stored in Orthanc), node restart included),
latency per image (Orthanc acknowledged the image to storescu -> Orthanc acknowledged its SR from the
node; median and p95), lost (images without an SR in Orthanc) and duplicates (SRs beyond one per image),
both counted from the archive's own contents. Exit code 1 when anything is lost or duplicated.

Without ``--run`` a small conv6 run (32x32 input) is trained first on 24 phantoms (seconds on a CPU), as
``benchmarks.node_throughput`` does.
:func:`run_roundtrip` is what ``tests/salad_med/dicom/test_orthanc.py`` runs at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.node_throughput import _train_run

ACK_RE = re.compile(r"Received Store Response \((Success|Warning)")
SEND_RE = re.compile(r"Sending file: (.+)$")


def make_instances(root: Path, senders: int, per_sender: int, size: int = 64, seed: int = 3) -> list[list[Path]]:
    """``senders`` lists of ``per_sender`` distinct CR/DX instances (two views per study, uncompressed).

    A few phantoms are drawn, then copied under new Study/Series/SOP Instance UIDs (cheap for thousands).
    """
    import pydicom
    from pydicom.uid import generate_uid

    from salad_med.synthetic.phantom import write_dicom_tree

    base = write_dicom_tree(root / "base", n=12, seed=seed, size=(size, size))
    base = base[base.transfer_syntax != "rle lossless"].reset_index(drop=True)
    datasets = [pydicom.dcmread(p) for p in base.source_path]
    out = []
    for s in range(senders):
        files = []
        for j in range(per_sender):
            ds = datasets[j % len(datasets)]
            # one string with separators: pydicom joins entropy sources without one ("1", "12" == "11", "2")
            ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"{root}|{seed}|study|{s}|{j // 2}"])
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"{root}|{seed}|series|{s}|{j}"])
            uid = generate_uid(entropy_srcs=[f"{root}|{seed}|sop|{s}|{j}"])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            path = root / "send" / f"s{s:02d}" / f"{j:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        out.append(files)
    return out


class Sender(threading.Thread):
    """One storescu association sending a list of files, resending what was not acknowledged (Orthanc
    restarting) until every file is acknowledged or ``deadline``; records each acknowledgement time."""

    def __init__(self, storescu: str, port: int, files: list[Path], deadline: float, aet: str = "MODALITY"):
        super().__init__(daemon=True)
        self.storescu, self.port, self.files, self.deadline, self.aet = storescu, port, files, deadline, aet
        self.acked: dict[str, float] = {}
        self.attempts = 0

    def run(self) -> None:
        while time.time() < self.deadline:
            todo = [str(f) for f in self.files if str(f) not in self.acked]
            if not todo:
                return
            self.attempts += 1
            proc = subprocess.Popen([self.storescu, "-v", "-aet", self.aet, "-aec", "ORTHANC", "127.0.0.1",
                                     str(self.port), *todo], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            current = None
            for line in proc.stdout:
                if (m := SEND_RE.search(line)) is not None:
                    current = m.group(1).strip()
                elif current and ACK_RE.search(line):
                    self.acked.setdefault(current, time.time())
                    current = None
            proc.wait()
            if len(self.acked) < len(self.files):
                time.sleep(0.5)  # the archive is restarting: try the rest again


def wait_echo(port: int, timeout: float, proc: subprocess.Popen | None = None, aet: str = "ORTHANC") -> bool:
    """Wait until a DICOM node answers C-ECHO on 127.0.0.1:``port``."""
    from salad_med.dicom.tools import dcmtk_tool

    echoscu = dcmtk_tool("echoscu")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        done = subprocess.run([echoscu, "-aet", aet, "-aec", "SALAD", "127.0.0.1", str(port)], capture_output=True,
                              timeout=30)
        if done.returncode == 0:
            return True
        time.sleep(0.3)
    return False


def serve_command(run_dir: Path, out: Path, port: int, orthanc, *, study_quiet: float = 0.0,
                  route_user: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """``salad-med serve`` routed from and forwarding to ``orthanc`` (a LocalOrthanc)."""
    cmd = [sys.executable, "-m", "salad_med", "-q", "serve", "--run", str(run_dir), "--output", str(out),
           "--allow", orthanc.aet, "--host", "127.0.0.1", "--port", str(port),
           "--forward", f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}", "--route-from", orthanc.url,
           "--study-quiet", str(study_quiet), *extra]
    return cmd + (["--route-user", route_user] if route_user else [])


class NodeProcess:
    """``salad-med serve`` as a subprocess that can be killed (SIGKILL) and restarted."""

    def __init__(self, cmd: list[str], port: int, env: dict, log: Path):
        self.cmd, self.port, self.env, self.log = cmd, port, env, log
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180.0) -> NodeProcess:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1
        if not wait_echo(self.port, timeout, self.proc):
            tail = self.log.read_text(errors="replace")[-1500:]
            self.stop(kill=True)
            msg = f"salad-med serve did not start: {tail}"
            raise RuntimeError(msg)
        return self

    def stop(self, kill: bool = False, timeout: float = 120.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def _results_rows(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            return max(0, sum(1 for _ in fh) - 1)
    except OSError:
        return 0


def _forwarded_times(audit: Path) -> dict[str, float]:
    """First "forwarded" time per image UID (the SR's outbox name) from the node's audit log."""
    out: dict[str, float] = {}
    if not audit.exists():
        return out
    for line in audit.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "forwarded" and rec.get("sop_instance_uid"):
            out.setdefault(rec["sop_instance_uid"], datetime.fromisoformat(rec["time"]).timestamp())
    return out


def run_roundtrip(run_dir: Path, root: Path, *, senders: int = 20, per_sender: int = 50, size: int = 64,
                  kill_at: float | None = None, timeout: float = 600.0, stall_s: float = 120.0,
                  log=print) -> dict:
    """Send ``senders`` x ``per_sender`` images through Orthanc -> node -> Orthanc and count the SRs.

    Args:
        run_dir: the trained run the node serves.
        root: scratch folder (Orthanc database, node folder, the instances sent).
        senders, per_sender: concurrent storescu associations and images each.
        size: phantom size in pixels.
        kill_at: SIGKILL the node once this fraction of the images is scored, then restart it.
        timeout: seconds for the whole run.
        stall_s: stop waiting when the archive has not changed for this long after the last send.

    Returns:
        Figures (``images``, ``images_per_s``, ``latency_median_s``, ``latency_p95_s``, ``lost``,
        ``duplicates``, ``node_starts``, ...) and ``inventory`` (the archive's contents).
    """
    from salad_med.dicom.orthanc import LocalOrthanc, archive_inventory, free_port
    from salad_med.dicom.tools import dcmtk_tool

    root.mkdir(parents=True, exist_ok=True)
    batches = make_instances(root, senders, per_sender, size)
    n = senders * per_sender
    node_port = free_port()
    orthanc = LocalOrthanc(root / "orthanc", modalities={"salad": ("SALAD", "127.0.0.1", node_port)}, dicomweb=False)
    orthanc.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    node = NodeProcess(serve_command(run_dir, root / "node", node_port, orthanc), node_port, env, root / "node.log")
    try:
        node.start()
        start = time.time()
        deadline = start + timeout
        threads = [Sender(dcmtk_tool("storescu"), orthanc.dicom_port, files, deadline) for files in batches]
        for t in threads:
            t.start()
        killed_at = None
        import requests

        last_count, last_change = -1, time.time()
        while time.time() < deadline:
            if kill_at is not None and killed_at is None and _results_rows(root / "node" / "results.csv") >= kill_at * n:
                node.stop(kill=True)
                killed_at = time.time()
                log(f"  node killed (SIGKILL) after {_results_rows(root / 'node' / 'results.csv')} of {n} scored")
                node.start()
                log(f"  node back after {time.time() - killed_at:.1f} s")
            count = int(requests.get(f"{orthanc.url}/statistics", timeout=30).json()["CountInstances"])
            senders_done = all(not t.is_alive() for t in threads)
            if count >= 2 * n and senders_done:
                break
            if count != last_count:
                last_count, last_change = count, time.time()
            elif senders_done and time.time() - last_change > stall_s:
                log(f"  no new instance in Orthanc for {stall_s:.0f} s: counting what arrived")
                break
            time.sleep(0.2)
        end = time.time()
        inventory = archive_inventory(orthanc.url)
    finally:
        node.stop()
        orthanc.stop()
    acked = {}
    for t in threads:
        acked.update(t.acked)
    uid_of = {}
    import pydicom

    for files in batches:
        for f in files:
            uid_of[str(f)] = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    forwarded = _forwarded_times(root / "node" / "audit.jsonl")
    latency = np.array([forwarded[uid_of[f]] - t for f, t in acked.items() if uid_of[f] in forwarded])
    counts = inventory.srs_per_image()
    lost = int((counts == 0).sum()) + (n - len(counts))
    result = {
        "senders": senders, "per_sender": per_sender, "images": n, "acked_by_orthanc": len(acked),
        "seconds": round(end - start, 2), "images_per_s": round(n / (end - start), 2),
        "latency_median_s": round(float(np.median(latency)), 3) if latency.size else None,
        "latency_p95_s": round(float(np.percentile(latency, 95)), 3) if latency.size else None,
        "lost": lost, "duplicates": int((counts - 1).clip(lower=0).sum()),
        "sr_in_archive": len(inventory.image_srs), "node_starts": node.starts,
        "killed_after_s": round(killed_at - start, 2) if killed_at else None,
    }
    result["inventory"] = inventory
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks pacs_roundtrip", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="trained run (default: train a tiny one)")
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--per-sender", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction scored when the node is killed")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv or [])
    from salad_med.dicom.orthanc import orthanc_missing_reason
    from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool

    missing = orthanc_missing_reason() or ("" if dcmtk_tool("storescu") and dcmtk_tool("echoscu") else
                                           dcmtk_missing_reason("storescu"))
    if missing:
        print(f"skipped: {missing}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="pacs_roundtrip-") as tmp:
        tmp = Path(tmp)
        run_dir = args.run or _train_run(tmp / "train", 64, ["data.image_size=32", "preprocess.size=32"])
        rows = {}
        for name, kill in (("steady", None), ("node killed", args.kill_at)):
            print(f"{name}: {args.senders} associations x {args.per_sender} images", flush=True)
            res = run_roundtrip(run_dir, tmp / name.replace(" ", "_"), senders=args.senders,
                                per_sender=args.per_sender, size=args.size, kill_at=kill, timeout=args.timeout)
            res.pop("inventory")
            rows[name] = res
        header = f"{'run':<12} {'images':>6} {'img/s':>7} {'median s':>9} {'p95 s':>7} {'lost':>5} {'dup':>4} {'starts':>6}"
        print(header)
        for name, r in rows.items():
            print(f"{name:<12} {r['images']:>6} {r['images_per_s']:>7} {r['latency_median_s']:>9} "
                  f"{r['latency_p95_s']:>7} {r['lost']:>5} {r['duplicates']:>4} {r['node_starts']:>6}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    bad = any(r["lost"] or r["duplicates"] for r in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
