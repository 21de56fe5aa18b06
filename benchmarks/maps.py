"""Anomaly-map quality on phantoms with known anomaly masks: ``python -m benchmarks maps``.

The demo's phantoms (:func:`salad_med.synthetic.phantom.generate_demo_dataset`: forearms and humeri with
enlarged fractures, lesions and implants, no carrier, no markers) are preprocessed and split like
``salad-med demo``; each method is trained with the same reduced budget (``--epochs`` pre-training
epochs + 2 rounds x ``--round-epochs``). For every abnormal *test* image, each map kind the run offers
(:attr:`~salad_med.evaluation.inference.RunModel.map_kinds`) is computed on the model grid, mapped back
onto the phantom's pixel grid with the inverse preprocessing (:meth:`RunModel.map_file`), and compared with
the phantom's truth ``anomaly_mask``:

* ``pixel AUROC``: every pixel of the abnormal test images pooled, mask pixels positive; ``in body``:
  only the pixels of the phantom's body (where in the body, not body vs background);
* ``max in mask``: fraction of the images whose map maximum lies inside the mask; ``chance`` = mean
  mask area fraction (a map pointing at a random pixel);
* ``s/image``: wall time of one map (including preprocessing and the inverse), single thread.

``--modes`` also compares the occlusion fills (:func:`salad_med.methods.base.occlusion_map`: the default
``blur``, MONAI's ``mean_img`` and ``gaussian``) on every method. Everything is deterministic given ``--seed``.

Measured (``--modes``, defaults otherwise: 300 patients, 10 + 2 x 2 epochs at 64x64, 60 abnormal test
images of 128x112, mask area 1.5 %; one thread on a shared 2-core CPU; * = the run's default map)::

    method     map (val AUC)            pixel AUROC  in body  max in mask  s/image
    salad      occlusion* (0.82)           0.446      0.584     0.100       2.14
    salad      reconstruction              0.275      0.649     0.017       0.84
    memdae     occlusion* (0.75)           0.386      0.581     0.100       0.75
    memdae     reconstruction              0.722      0.765     0.150       0.31
    dae        reconstruction* (0.74)      0.692      0.743     0.217       0.28
    dae        occlusion                   0.476      0.524     0.117       1.70
    deep_svdd  occlusion* (0.86)           0.345      0.546     0.117       0.75
    pixel_knn  occlusion* (0.97)           0.605      0.799     0.383       0.56
    pca        occlusion* (0.97)           0.597      0.768     0.300       0.50
    chance                                 0.5        0.5       0.015

Occlusion fill, in-body pixel AUROC (blur / mean_img / gaussian): salad 0.584 / 0.545 / 0.533, memdae
0.581 / 0.362 / 0.448, dae 0.524 / 0.268 / 0.323, deep_svdd 0.546 / 0.326 / 0.432, pixel_knn 0.799 /
0.332 / 0.458, pca 0.768 / 0.286 / 0.380: ``blur`` is the default. A grey or dark patch is itself an
anomaly on a radiograph (the map then goes negative over the body: overall AUROC < 0.5); the blur hides
structure, not brightness. Every map points at the anomaly 7-25x more often than chance, but the
embedding methods' occlusion maps are coarse (pixel AUROC in the body 0.55-0.58); the maps are a
pointer, not a segmentation. Whole-image pixel AUROC counts the (masked, black) background too: the
reconstruction error there makes SALAD's overall figure 0.275 although it ranks body pixels at 0.649.
Time: the phantoms 20 s, training salad 569 s, memdae 291 s, dae 322 s, deep_svdd 196 s, pixel_knn 9 s,
pca 3 s (load average ~7 on 2 cores), maps of all variants 1217 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("salad", "memdae", "dae", "deep_svdd", "pixel_knn", "pca")


def _prepare(out: Path, patients: int, seed: int, overrides: list[str]):
    """Phantoms -> preprocessed PNGs -> split manifest (the demo's steps); returns (split_csv, truth)."""
    import pandas as pd

    from salad_med.config import load_config
    from salad_med.data.preprocess_job import run_preprocess
    from salad_med.data.splits import make_split, write_split
    from salad_med.demo import DEMO_ANOMALY_SCALE, DEMO_BODY_PARTS, DEMO_SPEC_OVERRIDES
    from salad_med.synthetic.phantom import generate_demo_dataset

    cfg = load_config("demo", overrides)
    split_csv = out / "split.csv"
    truth_csv = out / "truth.csv"
    if split_csv.is_file() and truth_csv.is_file():
        return split_csv, pd.read_csv(truth_csv, dtype=str, keep_default_na=False)
    side = max(64, 2 * cfg.preprocess.size)
    truth = generate_demo_dataset(out / "data", n_patients=patients, size=(side, side - side // 8), seed=seed,
                                  n_dicom=0, anomaly_scale=DEMO_ANOMALY_SCALE, body_parts=DEMO_BODY_PARTS,
                                  spec_overrides=DEMO_SPEC_OVERRIDES)
    summary = run_preprocess("mura", out / "data" / "mura", out / "preprocessed", cfg)
    manifest = pd.read_csv(summary.manifest_path, dtype=str, keep_default_na=False)
    manifest = manifest[manifest["status"] != "failed"].copy()
    manifest["label"] = manifest["label"].astype(int)
    split = make_split(manifest, anomalous_ratio=cfg.split.anomalous_ratio, train_fraction=cfg.split.train_fraction,
                       group=cfg.split.group, seed=seed)
    write_split(split, split_csv, {"seed": seed, "benchmark": "maps"})
    truth["truth_file"] = [str(Path(r) / t) for r, t in zip(truth["tree_root"], truth["truth_path"], strict=True)]
    truth.to_csv(truth_csv, index=False)
    return split_csv, truth.astype(str)


def _abnormal_test(split_csv: Path, truth, limit: int):
    """(source_path, anomaly mask, body mask, anomaly kind) of the abnormal test images (at most ``limit``)."""
    import pandas as pd

    from salad_med.synthetic.phantom import load_truth

    split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    by_src = {str(Path(p).resolve()): f for p, f in zip(truth["source_path"], truth["truth_file"], strict=True)}
    rows = split[(split["split"] == "test") & (split["label"] == "1")]
    out = []
    for src in rows["source_path"]:
        t = load_truth(by_src[str(Path(src).resolve())])
        if t["anomaly_mask"].any():
            out.append((src, t["anomaly_mask"], t["body_mask"], t["anomaly"] or ""))
    return out[:limit] if limit else out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder, reused when it holds the data and runs (default: a new temp folder)")
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=10, help="pre-training epochs")
    parser.add_argument("--round-epochs", type=int, default=2, help="epochs per round (2 rounds)")
    parser.add_argument("--images", type=int, default=60, help="abnormal test images mapped (0 = all)")
    parser.add_argument("--modes", action="store_true", help="also compare the occlusion fillers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.evaluation.inference import load_run
    from salad_med.evaluation.maps import map_quality

    torch.set_num_threads(1)
    out = args.workdir or Path(tempfile.mkdtemp(prefix="salad_maps_"))
    out.mkdir(parents=True, exist_ok=True)
    base = [f"seed={args.seed}", f"data.cache_dir={(out / 'cache').resolve()}",
            f"train.pretrain_epochs={args.epochs}", "train.rounds=2", f"train.epochs_per_round={args.round_epochs}"]
    start = time.perf_counter()
    split_csv, truth = _prepare(out, args.patients, args.seed, base)
    items = _abnormal_test(split_csv, truth, args.images)
    print(f"{args.patients} phantom patients; {len(items)} abnormal test images with masks "
          f"({time.perf_counter() - start:.0f} s to prepare)", flush=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        run_dir = out / "runs" / method
        if not (run_dir / "best.pt").is_file():
            t0 = time.perf_counter()
            train_from_manifest(load_config("demo", [*base, f"train.method={method}"]), split_csv, run_dir)
            print(f"{method}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        model = load_run(run_dir)
        variants = [(k, {}) for k in model.map_kinds]
        if args.modes:
            variants += [("occlusion", {"mode": m}) for m in ("mean_img", "gaussian")]
        for kind, opts in variants:
            maps, masks, bodies, seconds = [], [], [], []
            for src, mask, body, _ in items:
                t0 = time.perf_counter()
                fm = model.map_file(src, kind, **opts)
                seconds.append(time.perf_counter() - t0)
                maps.append(fm.original_map)
                masks.append(mask)
                bodies.append(body)
            q = map_quality(maps, masks, bodies)
            label = kind + (f" ({opts['mode']})" if opts else "")
            default = kind == model.map_kinds[0] and not opts
            row = {"method": method, "map": label, "default": default, "val_auc": model.val_metrics.get("auc"),
                   **q, "s_per_image": float(np.median(seconds))}
            rows.append(row)
            print(f"{method:10s} {label:24s}{'*' if default else ' '} pixel AUROC {q['pixel_auroc']:.3f} "
                  f"(in body {q['pixel_auroc_region']:.3f})  "
                  f"max in mask {q['max_in_mask']:.3f} (chance {q['chance_max_in_mask']:.3f}, n={q['n']})  "
                  f"{row['s_per_image']:.2f} s/image", flush=True)
    (out / "maps.json").write_text(json.dumps(rows, indent=2))
    print(f"* = the run's default map; wrote {out / 'maps.json'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
