"""The demo job (``salad-med demo``): phantoms -> preprocess -> split -> train SALAD and a DAE -> evaluate.

Everything runs on synthetic MURA-like phantoms (:func:`salad_med.synthetic.phantom.generate_demo_dataset`) whose
right answer is known, on a CPU, in a few minutes. The report folder holds the per-method metrics, ROC/PR
curves of both methods, score histograms, training curves, the preprocessing contact sheet and the scores
of a few DICOM phantoms (the ``salad-med score`` path); ``report/report.html`` compares the methods on one
self-contained page and links each method's ``evaluate`` report (``report/<method>/report.html``, with
anomaly maps and the per-anomaly-type table).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preprocessing.atomic import atomic_path, atomic_write_text

__all__ = ["run_demo", "QUICK_OVERRIDES", "DEMO_ANOMALY_SCALE", "DEMO_BODY_PARTS", "DEMO_SPEC_OVERRIDES",
           "DEMO_PATIENTS"]

#: Phantom anomaly size multiplier of the demo (:attr:`salad_med.synthetic.phantom.PhantomSpec.anomaly_scale`).
#: At the default 1.0 an anomaly covers 0.1-0.3 % of a 64x64 input (4-12 pixels), below what any
#: detector trained on a few hundred images can see (a supervised CNN reaches AUC ~0.5); 8 turns
#: fractures into missing bone segments and implants into long plates, clearly visible at 64x64.
DEMO_ANOMALY_SCALE = 8.0
#: Body parts of the demo phantoms: the two long-bone parts, so that normal anatomy varies little and
#: the anomalies (all drawn on long bones) are the main difference between normal and abnormal images.
DEMO_BODY_PARTS: tuple[str, ...] = ("XR_FOREARM", "XR_HUMERUS")
#: Phantom fields fixed in the demo: no X-ray carrier and no burned-in markers. Measured with a
#: pixel-space 1-NN probe on the 64x64 demo inputs: with carriers and markers normal images differ
#: from each other as much as from abnormal ones (AUC 0.59); without both, 0.91 (either alone: 0.62 /
#: 0.67). Carrier detection and segmentation are exercised by the preprocessing tests instead.
DEMO_SPEC_OVERRIDES: dict[str, object] = {"carrier": None, "markers": False}

#: Phantom patients of the demo (about 3 images each: 1,815 images). Measured
#: with the paper's lr 1e-4 and the demo budget: 300 patients give SALAD test AUC 0.79, 600 give 0.89
#: (an embedding-kNN detector needs normal neighbours close in pose and shape; the DAE: 0.96 / 0.98).
DEMO_PATIENTS = 600

#: Extra overrides of ``--quick`` (a smaller, shorter run for tests and smoke checks).
QUICK_OVERRIDES = ["data.image_size=32", "preprocess.size=32", "model.base_channels=8",
                   "train.pretrain_epochs=3", "train.rounds=2", "train.epochs_per_round=1"]


def _stage(timings: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 2)
    return now


def run_demo(output: str | Path, config: str | None = "demo", overrides: Sequence[str] | None = None, *,
             n_patients: int = DEMO_PATIENTS, methods: Sequence[str] = ("salad", "dae"), quick: bool = False,
             n_dicom: int = 4, n_boot: int = 500, anomaly_scale: float | None = None,
             body_parts: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole demo into ``output`` and return its summary (also written to ``report/summary.json``).

    Args:
        output: demo folder (``data/``, ``preprocessed/``, ``split.csv``, ``runs/<method>/``, ``report/``).
        config: config file or name (default ``configs/demo.yaml``).
        overrides: ``--set`` overrides.
        n_patients: phantom patients (about 2.2 images each).
        methods: methods trained with the same budget (``train.method`` values).
        quick: smaller images and fewer epochs (see :data:`QUICK_OVERRIDES`).
        n_dicom: DICOM phantoms scored at the end (0 = none).
        n_boot: bootstrap replicates of the CIs.
        anomaly_scale: phantom anomaly size multiplier (default :data:`DEMO_ANOMALY_SCALE`).
        body_parts: phantom body parts (default :data:`DEMO_BODY_PARTS`).

    Returns:
        ``{"results": [per-method dicts], "timings": {...}, "seconds": total, "output": ..., "report": the
        path of ``report/report.html``}``.
    """
    import pandas as pd

    from salad_med.config import load_config
    from salad_med.data.manifests import write_manifest
    from salad_med.data.preprocess_job import run_preprocess
    from salad_med.data.splits import make_split, write_split
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.errors import DataError
    from salad_med.evaluation.evaluate import evaluate_run
    from salad_med.evaluation.inference import load_run
    from salad_med.evaluation.plots import plot_roc_pr, plot_score_histograms
    from salad_med.synthetic.phantom import generate_demo_dataset

    start = t = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base = [*(QUICK_OVERRIDES if quick else []), *(overrides or []), "data.dataset=mura",
            f"data.cache_dir={(out / 'cache').resolve()}"]
    cfg = load_config(config, base)
    timings: dict[str, float] = {}

    # 1. phantoms (MURA-v1.1 tree + a few DICOM files), twice the preprocessing size
    side = max(64, 2 * cfg.preprocess.size)
    truth = generate_demo_dataset(out / "data", n_patients=n_patients, size=(side, max(64, side - side // 8)),
                                  seed=cfg.seed, n_dicom=n_dicom,
                                  anomaly_scale=DEMO_ANOMALY_SCALE if anomaly_scale is None else anomaly_scale,
                                  body_parts=tuple(body_parts or DEMO_BODY_PARTS),
                                  spec_overrides=DEMO_SPEC_OVERRIDES)
    t = _stage(timings, "phantoms", t)

    # 2. preprocess with the one pipeline of salad-med preprocess (carrier, segmentation, resize + pad)
    summary = run_preprocess("mura", out / "data" / "mura", out / "preprocessed", cfg, preview=8)
    t = _stage(timings, "preprocess", t)

    # 3. patient x body-part split with a known anomalous ratio
    manifest = pd.read_csv(summary.manifest_path, dtype=str, keep_default_na=False)
    manifest = manifest[manifest["status"] != "failed"].copy()
    if manifest.empty:
        msg = f"preprocessing produced no image ({summary.line()})"
        raise DataError(msg)
    manifest["label"] = manifest["label"].astype(int)
    split = make_split(manifest, anomalous_ratio=cfg.split.anomalous_ratio,
                       train_fraction=cfg.split.train_fraction, group=cfg.split.group, seed=cfg.seed)
    split_csv, _ = write_split(split, out / "split.csv", {"source": str(summary.manifest_path), "seed": cfg.seed,
                                                          "anomalous_ratio": cfg.split.anomalous_ratio})
    write_manifest(truth, out / "data" / "truth_all.csv")
    t = _stage(timings, "split", t)

    # 4-5. train each method with the same budget, evaluate on test
    results, scores = [], {}
    kinds = _anomaly_kinds(truth, split)
    for method in methods:
        mcfg = load_config(config, [*base, f"train.method={method}"])
        run_dir = out / "runs" / method
        trained = train_from_manifest(mcfg, split_csv, run_dir)
        t = _stage(timings, f"train_{method}", t)
        ev = evaluate_run(run_dir, "test", out / "report" / method, n_boot=n_boot, anomaly_types=kinds)
        t = _stage(timings, f"evaluate_{method}", t)
        shutil.copyfile(run_dir / "curves.png", out / "report" / method / "curves.png")
        df = pd.read_csv(Path(ev["output"]) / "scores.csv", dtype={"image_id": str})
        scores[method] = df
        results.append({"method": method, "auc": ev["auc"], "auc_ci95": ev["auc_ci95"], "auprc": ev["auprc"],
                        "auprc_ci95": ev["auprc_ci95"], "val_auc": trained["best_val_auc"],
                        "best_epoch": trained["best_epoch"], "epochs": trained["epochs"],
                        "train_seconds": round(trained["seconds"], 1), "n_test": ev["n"],
                        "n_test_abnormal": ev["n_abnormal"]})

    # 6. report: overlaid curves, histograms, per-anomaly-type AUC, DICOM scoring
    report = out / "report"
    first = scores[methods[0]]
    labelled = first["label"].isin([0, 1])
    y = first.loc[labelled, "label"].to_numpy()
    def column(name: str) -> dict:
        return {m: s.set_index("image_id").loc[first.loc[labelled, "image_id"], name].to_numpy()
                for m, s in scores.items()}

    plot_roc_pr(y, column("raw_score"), report / "roc.png", report / "pr.png")
    plot_score_histograms(y, column("score"), report / "score_histograms.png")
    per_kind = _per_anomaly_auc(scores, kinds)
    if per_kind is not None:
        with atomic_path(report / "auc_per_anomaly.csv") as tmp:
            per_kind.to_csv(tmp, index=False, float_format="%.4f")
    preview = out / "preprocessed" / "preview.png"
    if preview.is_file():
        shutil.copyfile(preview, report / "preprocess_preview.png")
    dicom_dir = out / "data" / "dicom"
    if n_dicom and dicom_dir.is_dir():  # the `salad-med score` path, with the first method's run
        ds = load_run(out / "runs" / methods[0]).score_paths([dicom_dir])
        with atomic_path(report / "dicom_scores.csv") as tmp:
            ds.to_csv(tmp, index=False, float_format="%.6g")
    t = _stage(timings, "report", t)
    total = round(time.perf_counter() - start, 1)
    summary_out = {"results": results, "timings": timings, "seconds": total, "output": str(out),
                   "n_images": int(len(split)), "preprocess": summary.line(),
                   "split_counts": {k: int(v) for k, v in split["split"].value_counts().items()},
                   "per_anomaly": [] if per_kind is None else json.loads(per_kind.to_json(orient="records"))}
    from salad_med.evaluation.report import write_compare_report

    summary_out["report"] = str(write_compare_report(
        report / "report.html", _results_table(results), scores,
        title=f"salad-med demo: {len(methods)} method(s) on {len(split)} phantom radiographs",
        subtitle=f"test split: {results[0]['n_test']} images, {results[0]['n_test_abnormal']} abnormal; "
                 f"total {total:.0f} s", links={f"{m}: evaluation report with anomaly maps": f"{m}/report.html"
                                                for m in methods}, per_anomaly=per_kind))
    atomic_write_text(report / "summary.json", json.dumps(summary_out, indent=2))
    with atomic_path(report / "results.csv") as tmp:
        pd.DataFrame(results).to_csv(tmp, index=False, float_format="%.4f")
    return summary_out


def _results_table(results: list[dict]):
    """The per-method results with the CIs as ``lo-hi`` text (the report's table)."""
    import pandas as pd

    def span(ci) -> str:
        return f"{ci[0]:.3f}-{ci[1]:.3f}"

    return pd.DataFrame(results).assign(auc_ci95=lambda d: d["auc_ci95"].map(span),
                                        auprc_ci95=lambda d: d["auprc_ci95"].map(span))


def _anomaly_kinds(truth, split) -> dict[str, str]:
    """image_id of the split manifest -> phantom anomaly kind ("" for normal), matched by source file."""
    if "anomaly" not in truth.columns or "source_path" not in truth.columns:
        return {}
    by_file = {str(Path(p).resolve()): ("" if a is None or a != a else str(a))
               for p, a in zip(truth["source_path"], truth["anomaly"], strict=True)}
    return {iid: by_file.get(str(Path(p).resolve()), "")
            for iid, p in zip(split["image_id"], split["source_path"], strict=True)}


def _per_anomaly_auc(scores: dict, kinds: dict[str, str]):
    """AUC of each method on normal test images vs each anomaly type (fracture, implant, lesion)."""
    import pandas as pd

    from salad_med.evaluation.metrics import auc

    if not kinds:
        return None
    rows = []
    for method, df in scores.items():
        df = df[df["label"].isin([0, 1])].copy()
        df["anomaly"] = df["image_id"].map(kinds).fillna("")
        normal = df[df["label"] == 0]
        for kind in sorted(k for k in df.loc[df["label"] == 1, "anomaly"].unique() if k):
            ab = df[(df["label"] == 1) & (df["anomaly"] == kind)]
            both = pd.concat([normal, ab])
            rows.append({"method": method, "anomaly": kind, "n_abnormal": len(ab),
                         "auc": auc(both["label"], both["raw_score"]) if len(normal) and len(ab) else float("nan")})
    return pd.DataFrame(rows, columns=["method", "anomaly", "n_abnormal", "auc"])
