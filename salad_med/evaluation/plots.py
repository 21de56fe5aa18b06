"""Figures of training and evaluation: loss/AUC curves, ROC and precision-recall curves, score histograms.

Every figure is rendered with matplotlib's non-interactive Agg backend and written atomically.

Example:
    >>> plot_training_curves(pd.read_csv("run/metrics.csv"), "run/curves.png")
    >>> plot_roc_pr(y, scores, "eval/roc.png", "eval/pr.png", label="SALAD")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.atomic import atomic_path

__all__ = ["plot_training_curves", "plot_roc_pr", "plot_score_histograms", "save_figure"]

_LOSS_COLUMNS = ("loss_total", "loss_rec", "loss_ss", "loss_agg", "loss_svdd")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_training_curves(metrics: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Loss components and validation AUC/AUPRC per epoch (``metrics.csv`` of a run).

    Args:
        metrics: rows with ``epoch`` and any of ``loss_*``, ``val_auc``, ``val_auprc``, ``round``.
        path: output PNG.
        title: figure title.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = metrics["epoch"].to_numpy() if "epoch" in metrics else np.arange(len(metrics))
    for col in _LOSS_COLUMNS:
        if col in metrics and (metrics[col].fillna(0) != 0).any():  # methods without a term: not drawn
            ax_loss.plot(epochs, metrics[col], marker="o", ms=3, label=col.replace("loss_", ""))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean loss")
    ax_loss.set_title("training losses")
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    for col, name in (("val_auc", "val AUC"), ("val_auprc", "val AUPRC")):
        if col in metrics and metrics[col].notna().any():
            ax_val.plot(epochs, metrics[col], marker="o", ms=3, label=name)
    if "round" in metrics and len(metrics):
        starts = metrics.loc[metrics["round"].diff().fillna(0) > 0, "epoch"]
        for x in starts:
            for ax in (ax_loss, ax_val):
                ax.axvline(x - 0.5, color="grey", lw=0.6, ls=":")
    ax_val.set_ylim(0, 1.02)
    ax_val.set_xlabel("epoch")
    ax_val.set_title("validation (dotted: round starts)")
    if ax_val.lines:
        ax_val.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_roc_pr(y: np.ndarray, scores: Mapping[str, np.ndarray] | np.ndarray, roc_path: str | os.PathLike,
                pr_path: str | os.PathLike, label: str = "model") -> tuple[Path, Path]:
    """ROC and precision-recall curves of one or several score vectors (higher = more abnormal).

    Args:
        y: (M,) labels 0/1.
        scores: (M,) scores, or ``{name: (M,) scores}`` to overlay methods.
        roc_path: output PNG of the ROC curve.
        pr_path: output PNG of the precision-recall curve.
        label: legend name when ``scores`` is one array.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _pyplot()
    series = scores if isinstance(scores, Mapping) else {label: scores}
    y = np.asarray(y).astype(int)
    fig_roc, ax_roc = plt.subplots(figsize=(4.6, 4.2))
    fig_pr, ax_pr = plt.subplots(figsize=(4.6, 4.2))
    for name, s in series.items():
        s = np.asarray(s, dtype=float)
        fpr, tpr, _ = roc_curve(y, s)
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
        prec, rec, _ = precision_recall_curve(y, s)
        ax_pr.plot(rec, prec, label=f"{name} (AP {average_precision_score(y, s):.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title("ROC")
    ax_roc.legend(fontsize=8, loc="lower right")
    ax_pr.axhline(y.mean(), color="grey", lw=0.8, ls="--")
    ax_pr.set_xlabel("recall")
    ax_pr.set_ylabel("precision")
    ax_pr.set_ylim(0, 1.02)
    ax_pr.set_title("precision-recall")
    ax_pr.legend(fontsize=8, loc="lower left")
    return save_figure(fig_roc, roc_path), save_figure(fig_pr, pr_path)


def plot_score_histograms(y: np.ndarray, scores: Mapping[str, np.ndarray], path: str | os.PathLike,
                          bins: int = 30) -> Path:
    """Normal vs abnormal score histograms, one panel per method."""
    plt = _pyplot()
    names: Sequence[str] = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    y = np.asarray(y).astype(int)
    for ax, name in zip(axes[0], names, strict=True):
        s = np.asarray(scores[name], dtype=float)
        edges = np.histogram_bin_edges(s, bins=bins)
        ax.hist(s[y == 0], bins=edges, alpha=0.6, label="normal")
        ax.hist(s[y == 1], bins=edges, alpha=0.6, label="abnormal")
        ax.set_title(name)
        ax.set_xlabel("anomaly score")
        ax.legend(fontsize=8)
    return save_figure(fig, path)
