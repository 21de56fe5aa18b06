"""DICOM node throughput: ``python -m benchmarks node_throughput`` (or ``python -m benchmarks.node_throughput``).

End to end, as a PACS would use it: dcmtk ``storescu`` sends phantom radiographs (``--size`` x
``--size``; CR/DX, MONOCHROME1/2, 8/12/16 bits, explicit/implicit little endian and RLE) to an
in-process :class:`~salad_med.dicom.node.ScoringNode` (the run's preprocessing + model, SR + results row).

* burst: ``--senders`` concurrent storescu processes send ``--images`` at once; throughput =
  images / (last SR written - first storescu started); queued latency per image = SR written
  (``results.csv`` ``scored_at``) - instance persisted (``received_at``), median and p95;
* paced: ``--paced`` images sent one at a time; latency = storescu started -> its SR written (the
  latency of an idle node, storescu process start included), median and p95.

Without ``--run`` a small conv6 run at ``--size`` is trained first on 24 phantoms (seconds, CPU),
so the model and preprocessing costs are those of a real run at that size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _train_run(root: Path, size: int, overrides: list[str]) -> Path:
    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.synthetic.phantom import write_dicom_tree

    files = write_dicom_tree(root / "train_dicom", n=24, seed=7, size=(size, size))
    split = files[["image_id", "source_path", "patient_id", "body_part", "study", "label"]].copy()
    split["split"] = ["train"] * 16 + ["val"] * 8
    split["group_id"] = split["patient_id"]
    split["known_anomaly"] = False
    split.to_csv(root / "split.csv", index=False)
    cfg = load_config("demo", ["data.dataset=dicom", f"data.image_size={size}", f"preprocess.size={size}",
                               "model.arch=conv6", "train.pretrain_epochs=2", "train.rounds=1",
                               "train.epochs_per_round=1", "train.batch_size=8", "train.k=8", "score.k=8",
                               *overrides])
    train_from_manifest(cfg, root / "split.csv", root / "run")
    return root / "run"


def _storescu(port: int, files: list[str], rle: bool = False) -> list[str]:
    from salad_med.dicom.tools import dcmtk_tool

    return [dcmtk_tool("storescu"), "-aet", "BENCH", "-aec", "SALAD", *(["-xr"] if rle else []), "127.0.0.1",
            str(port), *files]


def _burst(node, paths: list[str], rle: set[str], senders: int) -> dict:
    """All images at once from ``senders`` concurrent storescu processes: throughput and queued latency."""
    commands = []
    for i in range(senders):  # each sender: its share; RLE files in a second call that proposes RLE
        chunk = paths[i::senders]
        for is_rle in (False, True):
            part = [p for p in chunk if (p in rle) == is_rle]
            if part:
                commands.append(_storescu(node.port, part, is_rle))
    start_wall = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            msg = f"storescu failed: {err[-500:]}"
            raise RuntimeError(msg)
    sent = time.time() - start_wall
    if not node.wait_idle(600):
        msg = "the node did not finish in 600 s"
        raise RuntimeError(msg)
    res = node.results()
    if len(res) != len(paths) or int((res.status == "ok").sum()) != len(paths):
        msg = f"{len(paths)} sent, {len(res)} results, {int((res.status == 'ok').sum())} ok"
        raise RuntimeError(msg)
    last = float(res.scored_at.max())
    latency = res.latency_s.to_numpy(float)
    return {
        "burst_storescu_s": round(sent, 2), "burst_total_s": round(last - start_wall, 2),
        "throughput_img_per_s": round(len(paths) / (last - start_wall), 2),
        "burst_latency_median_s": round(float(np.median(latency)), 3),
        "burst_latency_p95_s": round(float(np.percentile(latency, 95)), 3),
    }


def _paced(node, paths: list[str]) -> dict:
    """One image at a time (storescu start -> its SR written): the latency of an idle node."""
    latencies = []
    for path in paths:
        before = len(node.results())
        start = time.time()
        proc = subprocess.run(_storescu(node.port, [path]), capture_output=True, text=True)
        if proc.returncode != 0:
            msg = f"storescu failed: {proc.stderr[-500:]}"
            raise RuntimeError(msg)
        node.wait_idle(120)
        res = node.results()
        if len(res) != before + 1:
            msg = f"{path}: expected one new result"
            raise RuntimeError(msg)
        latencies.append(float(res.scored_at.iloc[-1]) - start)
    return {"paced_images": len(latencies),
            "paced_latency_median_s": round(float(np.median(latencies)), 3),
            "paced_latency_p95_s": round(float(np.percentile(latencies, 95)), 3)}


def run(images: int = 120, size: int = 256, senders: int = 4, workers: int = 1, batch_size: int = 8,
        run_dir: str | None = None, keep: str | None = None, overrides: list[str] | None = None,
        paced_images: int = 20) -> dict:
    """Run the benchmark; returns the figures (see the module docstring)."""
    from salad_med.dicom.node import NodeSettings, ScoringNode
    from salad_med.dicom.tools import dcmtk_missing_reason, dcmtk_tool
    from salad_med.evaluation.inference import load_run
    from salad_med.synthetic.phantom import write_dicom_tree

    if dcmtk_tool("storescu") is None:
        msg = dcmtk_missing_reason("storescu")
        raise SystemExit(msg)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="salad_node_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        run_path = Path(run_dir) if run_dir else _train_run(root, size, list(overrides or []))
        t_train = time.perf_counter() - t0
        files = write_dicom_tree(root / "send", n=images, seed=11, size=(size, size))
        model = load_run(run_path)
        settings = NodeSettings(output_dir=root / "node", allowed_aets=("BENCH",), host="127.0.0.1", port=0,
                                workers=workers, batch_size=batch_size)
        paths = list(files.source_path)
        rle = set(files.source_path[files.transfer_syntax == "rle lossless"])
        with ScoringNode(settings, model.score_paths) as node:
            burst = _burst(node, paths, rle, senders)
            fresh = write_dicom_tree(root / "paced", n=paced_images, seed=12, size=(size, size))
            paced = _paced(node, list(fresh.source_path[fresh.transfer_syntax != "rle lossless"]))
        figures = {
            "images": len(paths), "size": size, "senders": senders, "workers": workers, "batch_size": batch_size,
            "model": f"{model.cfg.model.arch} @ {model.image_size}", "train_s": round(t_train, 1), **burst,
            **paced,
        }
        return figures
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes")
    parser.add_argument("--workers", type=int, default=1, help="node scoring threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--paced", type=int, default=20, help="images sent one at a time for the idle latency")
    parser.add_argument("--run", default=None, help="trained run directory (default: train a small one)")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="config override of the trained run, e.g. preprocess.segment=false (repeatable)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = run(args.images, args.size, args.senders, args.workers, args.batch_size, args.run, args.keep,
                  args.overrides, args.paced)
    table = pd.Series(figures).to_string()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
