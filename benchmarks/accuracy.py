"""SALAD vs MemDAE vs DAE on the real samples at equal CPU budget: ``python -m benchmarks accuracy``.

For each of ``../shared/data/cxr_sample`` (723 NIH chest X-rays, 64x64, patient groups) and
``../shared/data/msk_sample`` (300 FracAtlas radiographs, fractured vs not; image ids as groups):

1. ``salad-med preprocess``'s library function (:func:`salad_med.data.preprocess_job.run_preprocess`,
   dataset ``folder``: chest without carrier/segmentation, MSK with both);
2. a patient (x body part) split with AR = 5 % known anomalies in train
   (:func:`salad_med.data.splits.make_split`, ``train_fraction`` 0.4: 0.5 needs more normal groups than
   the chest sample has);
3. :func:`salad_med.cli.commands.compare.run_compare`: every method x seed trained with the same config
   (same epochs, batch, steps; conv6 at 64x64), model selection on ``val``, metrics on ``test``.

Prints method x AUC/AUPRC mean ± std per data set and writes ``accuracy.csv`` in the work folder.
These are small samples: read the spread across seeds before the means.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

#: (data folder, split group, preprocessing/model overrides)
DATASETS = {
    "cxr": ("cxr_sample", "patient", ["data.dataset=folder", "preprocess.detect_carrier=false",
                                      "preprocess.segment=false"]),
    "msk": ("msk_sample", "patient_bodypart", ["data.dataset=folder"]),
}
#: The equal budget of every method (configs/demo.yaml + these; the paper's lr 1e-4: on the demo phantoms
#: SALAD reached test AUC 0.60-0.63 at 1e-3 and 0.79 at 1e-4, see salad_med/commands/demo.py).
BUDGET = ["data.image_size=64", "preprocess.size=64", "model.arch=conv6", "model.base_channels=16",
          "train.batch_size=16", "train.lr=1e-4", "train.pretrain_epochs=10", "train.rounds=4",
          "train.epochs_per_round=5", "train.k=20", "score.k=20"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cxr,msk")
    parser.add_argument("--methods", default="salad,memdae,dae")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-fraction", type=float, default=0.4)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = parser.parse_args(argv)

    import pandas as pd
    from rich.console import Console

    from salad_med.config import load_config
    from salad_med.data.preprocess_job import run_preprocess
    from salad_med.data.splits import make_split, write_split
    from salad_med.evaluation.compare import format_table, run_compare

    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}: skipped")
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="salad_accuracy_"))
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    console = Console()
    frames = []
    for name in [d for d in args.datasets.split(",") if d]:
        folder, group, extra = DATASETS[name]
        overrides = [*BUDGET, *extra, *args.overrides]
        cfg = load_config("demo", overrides)
        start = time.perf_counter()
        summary = run_preprocess("folder", SHARED / folder, work / name / "preprocessed", cfg)
        manifest = pd.read_csv(summary.manifest_path, dtype=str, keep_default_na=False)
        manifest = manifest[manifest["status"] != "failed"].copy()
        manifest["label"] = manifest["label"].astype(int)
        split = make_split(manifest, anomalous_ratio=0.05, train_fraction=args.train_fraction, group=group, seed=0)
        split_csv, _ = write_split(split, work / name / "split.csv", {"dataset": name, "group": group,
                                                                       "train_fraction": args.train_fraction})
        counts = split.groupby(["split", "label"]).size().to_dict()
        print(f"{name}: {summary.line()}; split (split, label) -> images: {counts} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)

        def line(row, name=name):
            print(f"  {name} {row['method']} seed {row['seed']}: test AUC {row['test_auc']:.3f} "
                  f"AUPRC {row['test_auprc']:.3f} (val AUC {row['val_auc']:.3f}, best epoch {row['best_epoch']}"
                  f"/{row['epochs']}, {row['seconds']:.0f} s)", flush=True)

        runs, table = run_compare(split_csv, methods, seeds, work / name / "compare", "demo", overrides,
                                  n_boot=100, on_run=line)
        console.print(format_table(table, f"{name}: test AUC / AUPRC mean ± std over seeds {args.seeds}"))
        frames.append(table.assign(dataset=name))
    if frames:
        out = pd.concat(frames, ignore_index=True)
        out.to_csv(work / "accuracy.csv", index=False, float_format="%.4f")
        print(f"wrote {work / 'accuracy.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
