"""How fast the training data loader delivers images: ``python -m benchmarks loader``.

The trainer's training set (:func:`salad_med.data.dataset.build_datasets`, uint8 memmap cache already built)
read through a ``DataLoader`` as the trainer builds it (batch 16, its epoch sampler), one epoch of ``--rows``
images per window, with and without SALAD's augmented view per image (``train.augment_views`` = 1 / 0), at each
``--sizes`` side, with ``--workers`` loader processes (0 = in the training process). Windows are interleaved
(size x views x workers, repeated ``--repeats`` times) and the median reported: images/s, and CPU ms per
image of the one-process loader (the cost a loader process pays per image: with it, the number of loader
processes a GPU's rate needs is rate x ms / 1000, e.g. docs/distributed.md's 463 images/s at 512²).
Worker start-up is inside each window, as at the start of every training epoch.

Images: ``--rows`` synthetic radiograph-like PNGs (:func:`benchmarks.train_rss.write_manifest`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _loader(size: int, views: int, workers: int, manifest: Path, cache: Path):
    from torch.utils.data import DataLoader

    from salad_med.config import load_config
    from salad_med.data.dataset import build_datasets, load_split_manifest
    from salad_med.engine.distributed import ShardedEpochSampler

    cfg = load_config("nih", [f"data.image_size={size}", f"preprocess.size={size}", "train.method=salad",
                              f"train.augment_views={views}", f"data.augment={str(views > 0).lower()}"])
    ds = build_datasets(cfg, load_split_manifest(manifest), cache, ("train",), augment_train=views > 0)["train"]
    sampler = ShardedEpochSampler(len(ds), seed=0)
    return ds, sampler, DataLoader(ds, batch_size=16, sampler=sampler, num_workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--rows", type=int, default=320, help="images per epoch window")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.train_rss import write_manifest

    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    rows = int(args.rows / 0.9) + 1  # write_manifest keeps ~90 % as train
    with tempfile.TemporaryDirectory(prefix="salad_loader_") as tmp:
        work = Path(tmp)
        loaders, rate, cpu = {}, {}, {}
        for size in sizes:
            manifest = write_manifest(work / f"s{size}", rows, size, distinct=32)
            for views in (1, 0):
                for w in workers:
                    ds, sampler, dl = _loader(size, views, w, manifest, work / f"cache{size}")
                    loaders[size, views, w] = (ds, sampler, dl)
                    rate[size, views, w], cpu[size, views, w] = [], []
        for r in range(args.repeats):
            for key, (ds, sampler, dl) in loaders.items():
                ds.set_epoch(r)
                sampler.set_epoch(r)
                n = 0
                c0, t0 = time.process_time(), time.perf_counter()
                for batch in dl:
                    n += int(batch["image"].shape[0])
                dt = time.perf_counter() - t0
                rate[key].append(n / dt)
                cpu[key].append((time.process_time() - c0) / n * 1e3)
        print(f"{len(loaders[sizes[0], 1, workers[0]][0])} training images per epoch window, batch 16, "
              f"median of {args.repeats} interleaved windows (worker start-up included)")
        print(f"{'size':>5} {'views':>5} {'workers':>7} {'images/s':>9} {'ms/image (1 process)':>21}")
        for (size, views, w) in loaders:
            ms = f"{statistics.median(cpu[size, views, w]):21.2f}" if w == 0 else f"{'':>21}"
            print(f"{size:>5} {views:>5} {w:>7} {statistics.median(rate[size, views, w]):9.0f} {ms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
