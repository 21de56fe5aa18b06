"""Peak memory of training from a 40,000-row manifest at 256x256: ``python -m benchmarks train_rss``.

The point: the trainer's data cache never holds the dataset as float32 in RAM. A 40,000-row split
manifest (36,000 train / 2,000 val / 2,000 test) points at preprocessed 256x256 PNGs (``output_path``;
256 distinct images hard-linked to 40,000 file names, so every row is decoded on its own), and
``salad-med train``'s library path (:func:`salad_med.engine.trainer.train_from_manifest`) builds the uint8
memmap cache of train + val (38,000 x 256 x 256 = 2.5 GB on disk; as float32 it would be 10 GB) with 2
DataLoader workers, then trains the paper's chest net (conv6, 200-d, 36,000-row bank) for a few steps per
epoch (pre-training epoch + one round with its neighbourhood computation) with validation on the 2,000
val images each epoch.

Measured: peak RSS of this process (``ru_maxrss``), of the largest worker, and the peak of the summed
proportional set size (PSS) of the process and its live workers (sampled every 0.2 s from ``/proc``;
PSS counts each forked, shared page once). Target: <= 3 GB.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

TARGET_GB = 3.0


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared (copy-on-write) pages split between the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


class _Sampler(threading.Thread):
    """Samples the summed PSS of this process and its descendants (RSS would count forked pages twice)."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak_kb, self.stop = every, 0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            total = _pss_kb(me) + sum(_pss_kb(p) for p in _descendants(me))
            self.peak_kb = max(self.peak_kb, total)
            self.stop.wait(self.every)


def write_manifest(root: Path, rows: int, size: int, distinct: int = 256, seed: int = 0) -> Path:
    """``rows`` PNG file names (``distinct`` images hard-linked) and a split manifest ``root/split.csv``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bases = []
    for k in range(distinct):
        cx, cy = 0.5 + 0.1 * rng.standard_normal(2)
        img = 0.7 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) + 0.1 * rng.random((size, size))
        path = img_dir / f"base{k:04d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)
        bases.append(path)
    n_val = n_test = max(2, rows // 20)
    n_train = rows - n_val - n_test
    split = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    label = np.where(split == "train", (rng.random(rows) < 0.05).astype(int), rng.integers(0, 2, rows))
    paths = []
    for i in range(rows):
        p = img_dir / f"img{i:06d}.png"
        if not p.exists():
            try:
                os.link(bases[i % distinct], p)
            except OSError:
                shutil.copyfile(bases[i % distinct], p)
        paths.append(str(p))
    df = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(rows)], "source_path": paths,
                       "output_path": paths, "patient_id": [f"p{i:06d}" for i in range(rows)],
                       "body_part": "CHEST", "study": "000", "label": label, "split": split,
                       "known_anomaly": (split == "train") & (label == 1)})
    out = root / "split.csv"
    df.to_csv(out, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="train.max_steps_per_epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temp dir)")
    args = parser.parse_args(argv)

    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest

    work = args.workdir or Path(tempfile.mkdtemp(prefix="salad_rss_"))
    try:
        t0 = time.perf_counter()
        manifest = write_manifest(work, args.rows, args.size)
        t_write = time.perf_counter() - t0
        cfg = load_config("nih", [f"data.image_size={args.size}", f"preprocess.size={args.size}",
                                  f"data.num_workers={args.workers}", f"data.cache_dir={work / 'cache'}",
                                  f"train.max_steps_per_epoch={args.steps}", "train.pretrain_epochs=1",
                                  "train.rounds=1", "train.epochs_per_round=1"])
        sampler = _Sampler()
        sampler.start()
        t1 = time.perf_counter()
        result = train_from_manifest(cfg, manifest, work / "run")
        t_train = time.perf_counter() - t1
        sampler.stop.set()
        sampler.join()
        self_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        child_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        total_gb = sampler.peak_kb / 2**20
        cache_files = list((work / "cache").glob("*.npy"))
        cache_gb = sum(p.stat().st_size for p in cache_files) / 2**30
        n_cached = result["n_train"] + result["n_val"]
        f32_gb = n_cached * args.size**2 * 4 / 2**30
        print(f"manifest: {args.rows} rows ({result['n_train']} train, {result['n_val']} val) at "
              f"{args.size}x{args.size}; written in {t_write:.0f} s")
        print(f"train_from_manifest (cache build + {result['epochs']} epochs x {args.steps} steps + validation): "
              f"{t_train:.0f} s")
        print(f"uint8 cache on disk: {cache_gb:.2f} GiB (the same images as float32 would take {f32_gb:.2f} GiB)")
        print(f"peak RSS: main process {self_gb:.2f} GiB, largest worker {child_gb:.2f} GiB, "
              f"main + live workers (PSS) {total_gb:.2f} GiB (target <= {TARGET_GB} GB)")
        ok = max(self_gb, total_gb) * 2**30 / 1e9 <= TARGET_GB
        print(f"{'PASS' if ok else 'FAIL'}: peak {max(self_gb, total_gb) * 2**30 / 1e9:.2f} GB")
        return 0 if ok else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
