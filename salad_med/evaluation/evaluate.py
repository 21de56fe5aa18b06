"""``salad-med evaluate``: score one split of a run's manifest and measure it with bootstrap CIs.

Metrics are computed on the **raw** scores (the calibrated score is a monotone map of it, so AUC and
AUPRC are the same, without the ties a saturated calibration would add). Scores without spread are
refused (:func:`salad_med.scoring.calibration.check_spread`): an AUC of a constant is never reported.

Example:
    >>> result = evaluate_run("runs/demo", "test")
    >>> result["auc"], result["auc_ci95"]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from salad_med.errors import DataError
from salad_med.evaluation.inference import load_run

__all__ = ["evaluate_run", "group_metrics"]


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


def evaluate_run(run_dir: str | os.PathLike, split: str = "test", output: str | os.PathLike | None = None, *,
                 manifest: str | os.PathLike | None = None, checkpoint: str = "best", n_boot: int = 1000,
                 seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """Score one split of the run's manifest and measure AUC/AUPRC with bootstrap 95 % CIs.

    Writes to ``output`` (default ``RUN_DIR/eval-<split>``): ``metrics.json``, ``scores.csv``
    (image_id, body_part, label, score, raw_score, rank), ``per_body_part.csv``, ``config.yaml`` (the
    run's resolved config), ``roc.png``, ``pr.png``.

    Args:
        run_dir: the training run.
        split: ``test`` (default), ``val`` or ``train``.
        output: output folder.
        manifest: split manifest (default: the one recorded in the checkpoint).
        checkpoint: ``best`` / ``last`` / a path.
        n_boot: bootstrap replicates.
        seed: bootstrap seed.
        plots: write the ROC/PR PNGs.

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
    parts = group_metrics(labelled, "body_part")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False, float_format="%.8g")
    with atomic_path(out / "per_body_part.csv") as tmp:
        parts.to_csv(tmp, index=False, float_format="%.4f")
    save_config(cfg, out / "config.yaml")
    result["per_body_part"] = json.loads(parts.to_json(orient="records"))
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    if plots:
        from salad_med.evaluation.plots import plot_roc_pr

        plot_roc_pr(y, s, out / "roc.png", out / "pr.png", label=model.method_name)
    result["output"] = str(out)
    return result
