"""``salad-med evaluate``: score one split of a run's manifest and measure it with bootstrap CIs.

Metrics are computed on the **raw** scores (the calibrated score is a monotone map of it, so AUC and
AUPRC are the same, without the ties a saturated calibration would add). Scores without spread are
refused (:func:`salad_med.scoring.calibration.check_spread`): an AUC of a constant is never reported.

**Operating point.** A threshold is chosen on the *validation* split, never on the evaluated one: the
raw-score cut-off maximising Youden's J (sensitivity + specificity - 1) on the validation images
(:func:`salad_med.evaluation.metrics.youden_threshold`); it is recorded in ``metrics.json``
(``threshold``: rule, raw cut-off, its calibrated score, the validation and evaluated-split confusion
counts) and decides the false positives / negatives of ``report.html``. No threshold when the validation
split lacks either class.

**Report.** ``report.html`` (:func:`salad_med.evaluation.report.write_evaluation_report`): one
self-contained page with ROC/PR curves with bootstrap bands and CIs, score distributions per label and
per body part, the per-anomaly-type table (when the manifest has an ``anomaly`` column or
``anomaly_types`` is given), the top 24 / bottom 12 images and the threshold's errors with their anomaly
maps, the training curves and the resolved config.

When the manifest has a ``study`` column (MURA labels are per study), the images are also grouped by study
(``patient_id/body_part/study``, :func:`salad_med.dicom.study.manifest_study_keys`) and measured at study
level beside the image level: study score = max (default) or mean of its images' raw scores, study label =
abnormal when any of its images is.

Example:
    >>> result = evaluate_run("runs/demo", "test")
    >>> result["auc"], result["auc_ci95"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from salad_med.errors import DataError
from salad_med.evaluation.inference import load_run
from salad_med.log import get_logger

__all__ = ["evaluate_run", "group_metrics", "anomaly_type_metrics", "choose_threshold", "study_metrics",
           "THRESHOLD_RULE"]

log = get_logger("evaluate")

#: How the operating point is chosen (recorded in ``metrics.json``).
THRESHOLD_RULE = "Youden's J (sensitivity + specificity - 1) maximised on the validation raw scores"


def group_metrics(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """AUC/AUPRC per value of ``by`` on ``raw_score`` (NaN where a group holds one class only or its
    scores have no spread)."""
    from salad_med.errors import DegenerateScoreError
    from salad_med.evaluation.metrics import auc, auprc
    from salad_med.scoring.calibration import check_spread

    rows = []
    for value, g in df.groupby(by, sort=True):
        y, s = g["label"].to_numpy(), g["raw_score"].to_numpy()
        a = p = float("nan")
        if len(set(y.tolist())) == 2:
            try:
                check_spread(s, f"{by}={value}")
                a, p = auc(y, s), auprc(y, s)
            except DegenerateScoreError:
                pass
        rows.append({by: value, "n": len(g), "n_abnormal": int((y == 1).sum()), "auc": a, "auprc": p})
    return pd.DataFrame(rows, columns=[by, "n", "n_abnormal", "auc", "auprc"])


def anomaly_type_metrics(df: pd.DataFrame, kinds: pd.Series, threshold: float | None = None,
                         n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """AUC [95 % CI] of each anomaly type against all normal rows, and its sensitivity at ``threshold``.

    Args:
        df: labelled rows (``label``, ``raw_score``).
        kinds: anomaly type per row of ``df`` (same index; empty for normals / unknown).
    """
    from salad_med.evaluation.metrics import auc, bootstrap_ci

    normal = df[df["label"] == 0]
    rows = []
    kinds = kinds.reindex(df.index).fillna("").astype(str)
    for kind in sorted(k for k in kinds[df["label"] == 1].unique() if k):
        ab = df[(df["label"] == 1) & (kinds == kind)]
        both = pd.concat([normal, ab])
        y, s = both["label"].to_numpy(), both["raw_score"].to_numpy()
        a, (lo, hi) = (auc(y, s), bootstrap_ci(y, s, "auc", n_boot=n_boot, seed=seed)) if len(normal) else \
            (float("nan"), (float("nan"), float("nan")))
        sens = float((ab["raw_score"] >= threshold).mean()) if threshold is not None else float("nan")
        rows.append({"anomaly": kind, "n_abnormal": len(ab), "n_normal": len(normal), "auc": a, "auc_lo": lo,
                     "auc_hi": hi, "sensitivity_at_threshold": sens})
    return pd.DataFrame(rows, columns=["anomaly", "n_abnormal", "n_normal", "auc", "auc_lo", "auc_hi",
                                       "sensitivity_at_threshold"])


def choose_threshold(val: pd.DataFrame, evaluated: pd.DataFrame, split: str, calibrate) -> dict[str, Any] | None:
    """The validation-chosen operating point (:data:`THRESHOLD_RULE`) and its confusion counts.

    Args:
        val: validation rows (``label``, ``raw_score``); ``evaluated``: labelled rows of ``split``.
        calibrate: raw -> calibrated score (the run's calibration).

    Returns:
        ``{"rule", "raw", "score", "val": {...}, split: {...}}`` (confusion counts, sensitivity,
        specificity), or None when the validation rows lack a class.
    """
    from salad_med.evaluation.metrics import confusion_at, youden_threshold

    v = val[val["label"].isin([0, 1])]
    if v["label"].nunique() < 2:
        return None
    t = youden_threshold(v["label"], v["raw_score"])
    return {"rule": THRESHOLD_RULE, "raw": t.threshold, "score": float(calibrate(np.array([t.threshold]))[0]),
            "val": {"n": t.n, "n_abnormal": t.n_abnormal, "j": t.j,
                    **confusion_at(v["label"], v["raw_score"], t.threshold)},
            split: confusion_at(evaluated["label"], evaluated["raw_score"], t.threshold)}


def study_metrics(scores: pd.DataFrame, keys: pd.Series, *, how: str = "max", n_boot: int = 1000, seed: int = 0,
                  what: str = "study scores") -> tuple[dict[str, Any] | None, pd.DataFrame]:
    """Study-level AUC/AUPRC (bootstrap 95 % CIs over studies) of labelled image scores.

    Args:
        scores: image table with ``image_id``, ``label`` (0/1), ``score``, ``raw_score``.
        keys: the study key of each row (aligned with ``scores``).
        how: ``max`` or ``mean`` of the raw image scores.
        n_boot, seed: bootstrap replicates and seed.
        what: how the scores are named in a no-spread error.

    Returns:
        ``(metrics, studies)``: metrics is None when the studies hold one class only; ``studies`` is the
        ranked table of :func:`salad_med.dicom.study.aggregate_studies` with the study ``label``.

    Raises:
        DegenerateScoreError: the study scores have no spread.
    """
    from salad_med.dicom.study import aggregate_studies
    from salad_med.evaluation.metrics import auc, auprc, bootstrap_ci
    from salad_med.scoring.calibration import check_spread

    table = scores.assign(study=keys.to_numpy(), status="ok")
    studies = aggregate_studies(table, how=how)
    y = studies["label"].astype(int).to_numpy()
    s = studies["raw_score"].to_numpy(dtype=float)
    if len(set(y.tolist())) < 2:
        return None, studies
    check_spread(s, what)
    metrics = {"aggregate": how, "n": len(studies), "n_abnormal": int((y == 1).sum()), "n_normal": int((y == 0).sum()),
               "images_per_study": float(len(table) / len(studies)),
               "auc": auc(y, s), "auc_ci95": list(bootstrap_ci(y, s, "auc", n_boot=n_boot, seed=seed)),
               "auprc": auprc(y, s), "auprc_ci95": list(bootstrap_ci(y, s, "auprc", n_boot=n_boot, seed=seed))}
    return metrics, studies


def evaluate_run(run_dir: str | os.PathLike, split: str = "test", output: str | os.PathLike | None = None, *,
                 manifest: str | os.PathLike | None = None, checkpoint: str = "best", n_boot: int = 1000,
                 seed: int = 0, plots: bool = True, report: bool = True, map_kind: str | None = "auto",
                 anomaly_types: Mapping[str, str] | None = None, study_score: str = "max") -> dict[str, Any]:
    """Score one split of the run's manifest and measure AUC/AUPRC with bootstrap 95 % CIs.

    Writes to ``output`` (default ``RUN_DIR/eval-<split>``): ``metrics.json``, ``scores.csv``
    (image_id, body_part, label, score, raw_score, rank), ``per_body_part.csv``, ``per_anomaly.csv``
    (when anomaly types are known), ``config.yaml`` (the run's resolved config), ``roc.png``,
    ``pr.png`` and ``report.html``; with a ``study`` column in the manifest also ``studies.csv`` (ranked
    studies with their label) and ``metrics.json["study"]`` (study-level AUC and AUPRC with CIs; ``null``
    when the studies hold one class only).

    Args:
        run_dir: the training run.
        split: ``test`` (default), ``val`` or ``train``.
        output: output folder.
        manifest: split manifest (default: the one recorded in the checkpoint).
        checkpoint: ``best`` / ``last`` / a path.
        n_boot: bootstrap replicates.
        seed: bootstrap seed.
        plots: write the ROC/PR PNGs.
        report: write ``report.html``.
        map_kind: anomaly maps of the report's images (:data:`~salad_med.evaluation.maps.MAP_KINDS`), or
            None for images without maps (the maps cost :func:`~salad_med.methods.base.occlusion_map`'s
            forward passes per shown image, up to 84 images).
        anomaly_types: ``{image_id: anomaly type}`` for the per-anomaly-type table (default: the
            manifest's ``anomaly`` column when it has one).
        study_score: study-level score, ``max`` or ``mean`` of the image raw scores.

    Returns:
        The ``metrics.json`` content (plus ``"per_body_part"`` rows and ``"output"``).

    Raises:
        DataError: no manifest, no rows of ``split`` or no labelled rows with both classes.
        DegenerateScoreError: the scores of the split have no spread.
        CheckpointError: see :func:`~salad_med.evaluation.inference.load_run`.
    """
    from preprocessing.atomic import atomic_path, atomic_write_text
    from salad_med.config import save_config
    from salad_med.data.dataset import build_datasets, load_split_manifest
    from salad_med.engine.checkpoint import read_checkpoint
    from salad_med.evaluation.metrics import auc, auprc, bootstrap_ci
    from salad_med.scoring.calibration import check_spread

    run_dir = Path(run_dir)
    model = load_run(run_dir, checkpoint)
    if report and map_kind is not None:
        from salad_med.evaluation.maps import check_map_kind

        check_map_kind(model, map_kind)
    if manifest is None:
        manifest = read_checkpoint(model.checkpoint_path).get("manifest") or None
        if not manifest:
            msg = f"{model.checkpoint_path} records no manifest: give --manifest"
            raise DataError(msg)
    out = Path(output) if output else run_dir / f"eval-{split}"
    cfg = model.cfg
    df = load_split_manifest(manifest)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    ds = build_datasets(cfg, df, cache_dir, (split,), augment_train=False,
                        skipped_csv=out / "skipped.csv" if cfg.data.skip_missing else None)[split]
    scores = model.score_dataset(ds, batch_size=max(64, cfg.train.batch_size))
    scores.insert(1, "body_part", ds.rows["body_part"].astype(str).to_numpy() if "body_part" in ds.rows
                  else "UNKNOWN")
    scores["rank"] = scores["raw_score"].rank(ascending=False, method="min").astype(int)
    labelled = scores[scores["label"].isin([0, 1])]
    if labelled["label"].nunique() < 2:
        msg = f"the {split} split needs normal (0) and abnormal (1) labelled rows to compute AUC/AUPRC"
        raise DataError(msg)
    y, s = labelled["label"].to_numpy(), labelled["raw_score"].to_numpy()
    check_spread(s, f"{split} scores of {model.checkpoint_path}")
    result: dict[str, Any] = {
        "split": split, "method": model.method_name, "checkpoint": str(model.checkpoint_path),
        "epoch": model.epoch, "val_auc": model.val_metrics.get("auc"), "n": int(len(labelled)),
        "n_abnormal": int((y == 1).sum()), "n_normal": int((y == 0).sum()),
        "n_unlabelled": int(len(scores) - len(labelled)),
        "auc": auc(y, s), "auc_ci95": list(bootstrap_ci(y, s, "auc", n_boot=n_boot, seed=seed)),
        "auprc": auprc(y, s), "auprc_ci95": list(bootstrap_ci(y, s, "auprc", n_boot=n_boot, seed=seed)),
        "n_boot": n_boot, "manifest": str(manifest),
    }
    threshold, why = None, "the validation split lacks normal or abnormal images"
    try:
        val_scores = scores if split == "val" else model.score_dataset(
            build_datasets(cfg, df, cache_dir, ("val",), augment_train=False,
                           skipped_csv=out / "skipped-val.csv" if cfg.data.skip_missing else None)["val"],
            batch_size=max(64, cfg.train.batch_size))
        threshold = choose_threshold(val_scores, labelled, split, model.calibrate)
    except DataError as err:  # no (readable) validation rows: evaluated without an operating point
        why = f"no validation scores ({err})"
    result["threshold"] = threshold
    if threshold is None:
        result["threshold_note"] = f"no threshold: {why}"
    parts = group_metrics(labelled, "body_part")
    types = anomaly_types
    if types is None and "anomaly" in ds.rows:
        types = dict(zip(ds.rows["image_id"].astype(str), ds.rows["anomaly"].fillna("").astype(str), strict=True))
    per_anomaly = None
    if types:
        kinds = labelled["image_id"].astype(str).map(types)
        per_anomaly = anomaly_type_metrics(labelled, kinds, threshold["raw"] if threshold else None,
                                           n_boot=min(n_boot, 1000), seed=seed)
        result["per_anomaly"] = json.loads(per_anomaly.to_json(orient="records"))
    out.mkdir(parents=True, exist_ok=True)
    from salad_med.dicom.study import manifest_study_keys, write_studies_csv

    keys = manifest_study_keys(ds.rows)
    result["study"] = None
    if keys is not None:
        mask = scores["label"].isin([0, 1]).to_numpy()
        result["study"], studies = study_metrics(labelled, keys[mask], how=study_score, n_boot=n_boot, seed=seed,
                                                 what=f"{split} study scores of {model.checkpoint_path}")
        write_studies_csv(studies, out / "studies.csv")
        if result["study"] is not None:
            st = result["study"]
            log.info("study level (%s over images, %d studies, %d abnormal): AUC %.4f [95%% CI %.4f-%.4f], "
                     "AUPRC %.4f", study_score, st["n"], st["n_abnormal"], st["auc"], *st["auc_ci95"], st["auprc"])
    with atomic_path(out / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False, float_format="%.8g")
    with atomic_path(out / "per_body_part.csv") as tmp:
        parts.to_csv(tmp, index=False, float_format="%.4f")
    if per_anomaly is not None:
        with atomic_path(out / "per_anomaly.csv") as tmp:
            per_anomaly.to_csv(tmp, index=False, float_format="%.4f")
    save_config(cfg, out / "config.yaml")
    result["per_body_part"] = json.loads(parts.to_json(orient="records"))
    if report:
        result["report"] = str(out / "report.html")
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    if plots:
        from salad_med.evaluation.plots import plot_roc_pr

        plot_roc_pr(y, s, out / "roc.png", out / "pr.png", label=model.method_name)
    if report:
        from salad_med.evaluation.report import write_evaluation_report

        metrics_csv = run_dir / "metrics.csv"
        write_evaluation_report(out / "report.html", model=model, result=result, scores=scores, dataset=ds,
                                threshold=threshold, per_body_part=parts, per_anomaly=per_anomaly,
                                training=pd.read_csv(metrics_csv) if metrics_csv.is_file() else None,
                                config_text=(out / "config.yaml").read_text(), map_kind=map_kind,
                                n_boot=min(n_boot, 200), seed=seed)
    result["output"] = str(out)
    return result
