"""Every figure of salad-med, in one style: training curves, ROC/PR curves with bootstrap bands, score
distributions, and anomaly-map tiles.

One style for all: matplotlib's non-interactive Agg backend; axes always labelled; the number of images
(``n``) in every title; the colour-blind-safe Okabe-Ito palette (:data:`OKABE_ITO`; normal =
blue, abnormal = vermillion everywhere, :data:`LABEL_COLOURS`) for series, and the perceptually uniform
``inferno`` colour map (:data:`MAP_CMAP`) for anomaly maps. Figures are written atomically
(:func:`save_figure`) or returned as PNG bytes (:func:`figure_png`) for the self-contained HTML reports
(:mod:`salad_med.evaluation.report`).

Example:
    >>> plot_training_curves(pd.read_csv("run/metrics.csv"), "run/curves.png")
    >>> plot_roc_pr(y, scores, "eval/roc.png", "eval/pr.png", label="SALAD")
    >>> png = figure_png(roc_figure(y, {"SALAD": s}, band=True))
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.atomic import atomic_path

__all__ = ["OKABE_ITO", "SERIES_COLOURS", "LABEL_COLOURS", "MAP_CMAP", "style", "save_figure", "figure_png",
           "training_figure", "plot_training_curves", "roc_figure", "pr_figure", "plot_roc_pr",
           "score_histogram_figure", "plot_score_histograms", "body_part_figure", "map_tile", "map_colourbar",
           "n_title"]

#: Okabe & Ito (2008) colour-blind-safe palette, by name.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
#: Order of series colours (methods, loss terms): the most distinct first, yellow last.
SERIES_COLOURS = tuple(OKABE_ITO[k] for k in ("blue", "vermillion", "bluish_green", "orange", "reddish_purple",
                                              "sky_blue", "black", "yellow"))
#: Colours of the labels, the same in every figure.
LABEL_COLOURS = {"normal": OKABE_ITO["blue"], "abnormal": OKABE_ITO["vermillion"], "unlabelled": "#999999"}
#: Colour map of anomaly maps (perceptually uniform, readable with colour-vision deficiencies).
MAP_CMAP = "inferno"

_LOSS_COLUMNS = ("loss_total", "loss_rec", "loss_ss", "loss_agg", "loss_svdd")
_RC = {"axes.prop_cycle": None, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
       "axes.spines.right": False, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
       "legend.frameon": False, "figure.dpi": 100}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def style() -> Iterator[Any]:
    """The salad-med matplotlib style (palette, grid, fonts) for the figures built inside; yields pyplot."""
    plt = _pyplot()
    from cycler import cycler

    rc = {**_RC, "axes.prop_cycle": cycler(color=list(SERIES_COLOURS))}
    with plt.rc_context(rc):
        yield plt


def n_title(what: str, y: Any | None = None, n: int | None = None) -> str:
    """``"what (n = 120: 40 abnormal, 80 normal)"`` from labels ``y`` (0/1), or ``"what (n = 120)"``."""
    if y is not None:
        y = np.asarray(y).astype(int)
        return f"{what} (n = {y.size}: {int((y == 1).sum())} abnormal, {int((y == 0).sum())} normal)"
    return f"{what} (n = {n})"


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards), for data URIs."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ training
def training_figure(metrics: pd.DataFrame, title: str = ""):
    """Loss components and validation AUC/AUPRC per epoch (``metrics.csv`` of a run) -> Figure."""
    with style() as plt:
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
        epochs = metrics["epoch"].to_numpy() if "epoch" in metrics else np.arange(len(metrics))
        for col in _LOSS_COLUMNS:
            if col in metrics and (metrics[col].fillna(0) != 0).any():  # methods without a term: not drawn
                ax_loss.plot(epochs, metrics[col], marker="o", ms=3, label=col.replace("loss_", ""))
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("mean training loss")
        ax_loss.set_title(f"training losses ({len(metrics)} epochs)")
        if ax_loss.lines:
            ax_loss.legend()
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
        ax_val.set_ylabel("validation metric")
        ax_val.set_title("validation (dotted: round starts)")
        if ax_val.lines:
            ax_val.legend()
        if title:
            fig.suptitle(title)
    return fig


def plot_training_curves(metrics: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """:func:`training_figure` written to ``path`` (PNG).

    Args:
        metrics: rows with ``epoch`` and any of ``loss_*``, ``val_auc``, ``val_auprc``, ``round``.
        path: output PNG.
        title: figure title.
    """
    return save_figure(training_figure(metrics, title), path)


# ------------------------------------------------------------------------------------------------ curves
def _series(scores: Mapping[str, Any] | Any, label: str) -> dict[str, np.ndarray]:
    if isinstance(scores, Mapping):
        return {k: np.asarray(v, dtype=float) for k, v in scores.items()}
    return {label: np.asarray(scores, dtype=float)}


def _labels(y: Any, scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One label vector per series (``y`` may be one array for all, or a mapping like ``scores``)."""
    if isinstance(y, Mapping):
        return {k: np.asarray(y[k]).astype(int) for k in scores}
    return {k: np.asarray(y).astype(int) for k in scores}


def _curves(ax, kind: str, ys: Mapping[str, np.ndarray], series: Mapping[str, np.ndarray], band: bool,
            n_boot: int, seed: int, ci: Mapping[str, Sequence[float]] | None,
            points: Mapping[str, tuple[float, float]] | None) -> None:
    """Draw the ROC (``kind="roc"``) or PR curves of every series, with bands, CIs and operating points."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    from salad_med.evaluation.metrics import pr_band, roc_band

    for i, (name, s) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        if kind == "roc":
            x, y, _ = roc_curve(ys[name], s)
            text, step, band_fn = f"{name}: AUC {roc_auc_score(ys[name], s):.3f}", "default", roc_band
        else:
            y, x, _ = precision_recall_curve(ys[name], s)
            text, step, band_fn = f"{name}: AUPRC {average_precision_score(ys[name], s):.3f}", "steps-post", pr_band
        if ci and name in ci:
            text += f" [{ci[name][0]:.3f}-{ci[name][1]:.3f}]"
        ax.plot(x, y, color=colour, lw=1.6, label=text, drawstyle=step)
        if band:
            xs, lo, hi = band_fn(ys[name], s, n_boot=n_boot, seed=seed)
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.18, lw=0)
        if points and name in points:
            ax.plot(*points[name], marker="o", ms=6, color=colour, mec="black", ls="none")


def _curve_figure(kind: str, y: Any, scores: Mapping[str, Any] | Any, label: str, band: bool, n_boot: int,
                  seed: int, ci: Mapping[str, Sequence[float]] | None,
                  points: Mapping[str, tuple[float, float]] | None, title: str):
    series = _series(scores, label)
    ys = _labels(y, series)
    first = next(iter(ys.values()))
    with style() as plt:
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        _curves(ax, kind, ys, series, band, n_boot, seed, ci, points)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
            ax.set_xlabel("false positive rate (1 - specificity)")
            ax.set_ylabel("true positive rate (sensitivity)")
        else:
            ax.axhline(first.mean(), color="grey", lw=0.8, ls="--", label=f"prevalence {first.mean():.3f}")
            ax.set_xlabel("recall (sensitivity)")
            ax.set_ylabel("precision (positive predictive value)")
        ax.set_title(n_title(title, first) if len({len(v) for v in ys.values()}) == 1 else title)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.02)
        ax.legend(loc="lower right" if kind == "roc" else "lower left")
        if band:
            ax.text(0.98, 0.35 if kind == "roc" else 0.97, "shaded: 95 % bootstrap band", transform=ax.transAxes,
                    ha="right", fontsize=7, color="grey")
    return fig


def roc_figure(y: Any, scores: Mapping[str, Any] | Any, label: str = "model", *, band: bool = False,
               n_boot: int = 200, seed: int = 0, ci: Mapping[str, Sequence[float]] | None = None,
               points: Mapping[str, tuple[float, float]] | None = None, title: str = "ROC"):
    """ROC curves of one or several score vectors (higher = more abnormal) -> Figure.

    Args:
        y: (M,) labels 0/1, or ``{name: labels}`` when the series differ in rows.
        scores: (M,) scores or ``{name: (M,) scores}`` (overlaid).
        label: legend name when ``scores`` is one array.
        band: draw each curve's pointwise 95 % bootstrap band (:func:`~salad_med.evaluation.metrics.roc_band`).
        ci: ``{name: (lo, hi)}`` AUC CIs for the legend.
        points: ``{name: (fpr, tpr)}`` operating points to mark (e.g. the validation-chosen threshold).
        title: title; ``n`` is appended.
    """
    return _curve_figure("roc", y, scores, label, band, n_boot, seed, ci, points, title)


def pr_figure(y: Any, scores: Mapping[str, Any] | Any, label: str = "model", *, band: bool = False,
              n_boot: int = 200, seed: int = 0, ci: Mapping[str, Sequence[float]] | None = None,
              points: Mapping[str, tuple[float, float]] | None = None, title: str = "precision-recall"):
    """Precision-recall curves (abnormal = positive) -> Figure; arguments as :func:`roc_figure`
    (``points``: ``{name: (recall, precision)}``; the band: :func:`~salad_med.evaluation.metrics.pr_band`)."""
    return _curve_figure("pr", y, scores, label, band, n_boot, seed, ci, points, title)


def plot_roc_pr(y: np.ndarray, scores: Mapping[str, np.ndarray] | np.ndarray, roc_path: str | os.PathLike,
                pr_path: str | os.PathLike, label: str = "model") -> tuple[Path, Path]:
    """ROC and precision-recall curves of one or several score vectors, written as two PNGs.

    Args:
        y: (M,) labels 0/1.
        scores: (M,) scores, or ``{name: (M,) scores}`` to overlay methods.
        roc_path: output PNG of the ROC curve.
        pr_path: output PNG of the precision-recall curve.
        label: legend name when ``scores`` is one array.
    """
    return (save_figure(roc_figure(y, scores, label), roc_path),
            save_figure(pr_figure(y, scores, label), pr_path))


# ------------------------------------------------------------------------------------------------ scores
def _hist(ax, values: np.ndarray, edges: np.ndarray, colour: str, name: str) -> None:
    if values.size:
        ax.hist(values, bins=edges, alpha=0.55, color=colour, label=f"{name} (n = {values.size})")


def score_histogram_figure(y: Any, scores: Mapping[str, Any], bins: int = 30, *, xlabel: str = "anomaly score",
                           thresholds: Mapping[str, float] | None = None):
    """Normal vs abnormal (vs unlabelled, ``y = -1``) histograms, one panel per score vector -> Figure.

    Args:
        y: (M,) labels 1 / 0 / -1 (unknown).
        scores: ``{name: (M,) scores}``.
        xlabel: x-axis label.
        thresholds: ``{name: cut-off}`` drawn as a vertical line.
    """
    from matplotlib.ticker import MaxNLocator

    names = list(scores)
    y = np.asarray(y).astype(int)
    with style() as plt:
        fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            s = np.asarray(scores[name], dtype=float)
            edges = np.histogram_bin_edges(s[np.isfinite(s)], bins=bins)
            for value, key in ((0, "normal"), (1, "abnormal"), (-1, "unlabelled")):
                _hist(ax, s[y == value], edges, LABEL_COLOURS[key], key)
            if thresholds and name in thresholds:
                ax.axvline(thresholds[name], color="black", lw=1.0, ls="--", label="threshold (val)")
            ax.set_title(n_title(name, n=int(np.isfinite(s).sum())))
            ax.xaxis.set_major_locator(MaxNLocator(5))  # raw scores carry many digits: few ticks stay legible
            ax.set_xlabel(xlabel)
            ax.set_ylabel("images")
            ax.legend()
    return fig


def plot_score_histograms(y: np.ndarray, scores: Mapping[str, np.ndarray], path: str | os.PathLike,
                          bins: int = 30) -> Path:
    """Normal vs abnormal score histograms, one panel per method, written to ``path``."""
    return save_figure(score_histogram_figure(y, scores, bins), path)


def _horizontal() -> dict[str, Any]:
    import matplotlib

    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


_HORIZONTAL = _horizontal()


def body_part_figure(df: pd.DataFrame, score: str = "raw_score", group: str = "body_part",
                     threshold: float | None = None, xlabel: str = "raw anomaly score"):
    """Scores per body part, normal and abnormal side by side (box + points) -> Figure.

    Args:
        df: rows with ``group``, ``label`` (1/0/-1) and ``score``.
        threshold: cut-off drawn as a vertical line.
    """
    from matplotlib.ticker import MaxNLocator

    parts = sorted(df[group].astype(str).unique())
    with style() as plt:
        fig, ax = plt.subplots(figsize=(7.5, 0.55 * max(2, len(parts)) + 1.2))
        rng = np.random.default_rng(0)
        ticks, labels = [], []
        for i, part in enumerate(parts):
            g = df[df[group].astype(str) == part]
            for off, value, key in ((-0.18, 0, "normal"), (0.18, 1, "abnormal")):
                v = g.loc[g["label"] == value, score].to_numpy(dtype=float)
                if not v.size:
                    continue
                ax.boxplot(v, positions=[i + off], **_HORIZONTAL, widths=0.3, showfliers=False,
                           medianprops={"color": "black"}, boxprops={"color": LABEL_COLOURS[key]},
                           whiskerprops={"color": LABEL_COLOURS[key]}, capprops={"color": LABEL_COLOURS[key]})
                ax.scatter(v, i + off + rng.uniform(-0.08, 0.08, v.size), s=6, alpha=0.6,
                           color=LABEL_COLOURS[key], label=key if i == 0 else None)
            ticks.append(i)
            labels.append(f"{part}\n(n = {len(g)}, {int((g['label'] == 1).sum())} abn.)")
        if threshold is not None:
            ax.axvline(threshold, color="black", lw=1.0, ls="--", label="threshold (val)")
        ax.set_yticks(ticks, labels)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_ylim(-0.6, len(parts) - 0.4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(group.replace("_", " "))
        ax.set_title(n_title("scores per " + group.replace("_", " "), n=len(df)))
        handles, names = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, names, loc="best")
    return fig


# ------------------------------------------------------------------------------------------------ maps
def _lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[MAP_CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def map_tile(image: Any, amap: Any | None, vmax: float | None, size: int = 128, alpha: float = 0.6) -> bytes:
    """A radiograph and its anomaly map side by side as PNG bytes: ``[grey image | image + map]``.

    The map is clipped to ``[0, vmax]`` (negative values, where hiding a region raises the score, show
    nothing) and blended over the image with opacity proportional to its value, in :data:`MAP_CMAP`.
    Pass one ``vmax`` for all tiles of a page so colours compare across images.

    Args:
        image: (H, W) in [0, 1].
        amap: (H, W) map on the same grid, or None (the image alone).
        vmax: map value shown at full colour (None or <= 0: the image alone on both sides).
        size: side of each panel in pixels (bilinear resize).
    """
    from PIL import Image

    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    grey = Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    g = np.asarray(grey, dtype=np.float32) / 255.0
    rgb = np.repeat(g[..., None], 3, axis=2)
    if amap is not None and vmax is not None and vmax > 0:
        m = np.clip(np.asarray(amap, dtype=np.float32) / float(vmax), 0.0, 1.0)
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        colour = _lut()[m].astype(np.float32) / 255.0
        a = (alpha * m.astype(np.float32) / 255.0)[..., None]
        over = (1.0 - a) * rgb + a * colour
    else:
        over = rgb
    both = np.concatenate([rgb, np.ones((size, 3, 3), np.float32), over], axis=1)
    buf = io.BytesIO()
    Image.fromarray((np.clip(both, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def map_colourbar(vmax: float, label: str = "anomaly map value") -> bytes:
    """A horizontal colour bar of :data:`MAP_CMAP` from 0 to ``vmax`` (PNG bytes), the key of the map tiles."""
    with style() as plt:
        import matplotlib as mpl

        fig, ax = plt.subplots(figsize=(4.0, 0.55))
        norm = mpl.colors.Normalize(vmin=0.0, vmax=float(vmax) if vmax > 0 else 1.0)
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=MAP_CMAP), cax=ax, orientation="horizontal")
        ax.set_xlabel(label)
    return figure_png(fig)
