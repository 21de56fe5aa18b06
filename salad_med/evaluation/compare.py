"""Method x seed comparisons on one split with one budget (``salad-med compare``, the accuracy benchmark).

Every registered method (:func:`salad_med.methods.registry.available_methods`) can take part: SALAD, its
ablations, MemDAE, the DAE, Deep SVDD, the classic detectors and the survey comparators. Each run is
trained with the same config (same epochs, batch and steps for the networks), selected on ``val`` and
evaluated on ``test``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_compare", "summarise_runs", "format_table", "write_compare_page", "TABLE1_METHODS"]

#: The paper's Table 1 rows (the default of ``salad-med compare``).
TABLE1_METHODS = ("salad", "dae", "memdae", "salad_no_rec", "salad_no_agg", "deep_svdd")


def run_compare(manifest: str | Path, methods: Sequence[str], seeds: Sequence[int], output: str | Path,
                config: str | None = None, overrides: Sequence[str] | None = None, *, n_boot: int = 200,
                split: str = "test", on_run=None):
    """Train and evaluate every method x seed with one config (same epochs, batch and steps).

    Args:
        manifest: split manifest.
        methods: ``train.method`` values.
        seeds: ``seed`` values.
        output: folder: ``runs/<method>/seed<k>/`` (each with ``eval-<split>/report.html``, images without
            maps), ``runs.csv``, ``compare.csv`` and ``report.html`` (one row per method, the curves of
            each method's first seed overlaid, links to the runs' reports).
        config: config file or name; ``overrides``: ``--set`` strings applied to every run.
        n_boot: bootstrap replicates per evaluation.
        split: evaluated split (``test``; selection always uses ``val``).
        on_run: optional callback ``f(row_dict)`` after each run.

    Returns:
        ``(runs DataFrame, summary DataFrame)`` (also written as ``runs.csv`` and ``compare.csv``).
    """
    import pandas as pd

    from preprocessing.atomic import atomic_path
    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.evaluation.evaluate import evaluate_run

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = (out / "cache").resolve()
    rows: list[dict[str, Any]] = []
    for method in methods:
        for seed in seeds:
            cfg = load_config(config, [*(overrides or []), f"train.method={method}", f"seed={seed}",
                                       f"data.cache_dir={cache}"])
            run_dir = out / "runs" / method / f"seed{seed}"
            start = time.perf_counter()
            trained = train_from_manifest(cfg, manifest, run_dir)
            ev = evaluate_run(run_dir, split, run_dir / f"eval-{split}", n_boot=n_boot, seed=seed, plots=False,
                              map_kind=None)
            row = {"method": method, "seed": seed, "val_auc": trained["best_val_auc"],
                   "best_epoch": trained["best_epoch"], "epochs": trained["epochs"], "steps": trained["steps"],
                   f"{split}_auc": ev["auc"], f"{split}_auprc": ev["auprc"],
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            if on_run is not None:
                on_run(row)
    runs = pd.DataFrame(rows)
    summary = summarise_runs(runs, split)
    for frame, name in ((runs, "runs.csv"), (summary, "compare.csv")):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4f")
    write_compare_page(out, runs, summary, split, title=f"compare: {len(methods)} methods x {len(seeds)} seeds",
                       subtitle=f"manifest {Path(manifest).name}; trained with one config, selected on val, "
                                f"evaluated on {split}")
    return runs, summary


def write_compare_page(out: Path, runs, summary, split: str = "test", *, title: str, subtitle: str = "",
                       per_anomaly=None) -> Path:
    """``out/report.html`` from the runs under ``out/runs/<method>/seed<k>/eval-<split>/`` (see :func:`run_compare`)."""
    import pandas as pd

    from salad_med.evaluation.report import write_compare_report

    curves, links = {}, {}
    for r in runs.itertuples(index=False):
        ev = Path("runs") / r.method / f"seed{r.seed}" / f"eval-{split}"
        if r.method not in curves and (out / ev / "scores.csv").is_file():
            curves[r.method] = pd.read_csv(out / ev / "scores.csv", dtype={"image_id": str})
        if (out / ev / "report.html").is_file():
            links[f"{r.method}, seed {r.seed}"] = (ev / "report.html").as_posix()
    return write_compare_report(out / "report.html", summary, curves, title=title, subtitle=subtitle, runs=runs,
                                links=links, per_anomaly=per_anomaly, split=split)


def summarise_runs(runs, split: str = "test"):
    """Mean and sample std (ddof=1) of AUC/AUPRC per method, in the order the methods appear."""
    import pandas as pd

    out = []
    for method in dict.fromkeys(runs["method"]):
        r = runs[runs["method"] == method]
        out.append({"method": method, "n_seeds": len(r),
                    "auc_mean": r[f"{split}_auc"].mean(), "auc_std": r[f"{split}_auc"].std(ddof=1),
                    "auprc_mean": r[f"{split}_auprc"].mean(), "auprc_std": r[f"{split}_auprc"].std(ddof=1),
                    "val_auc_mean": r["val_auc"].mean(), "seconds_mean": r["seconds"].mean()})
    return pd.DataFrame(out)


def format_table(summary, title: str = ""):
    """A rich Table of ``method | AUC mean ± std | AUPRC mean ± std | val AUC | s/run``."""
    from rich.table import Table

    def pm(m, s):
        return f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}"

    table = Table(title=title or None)
    for col in ("method", "seeds", "AUC", "AUPRC", "val AUC", "s/run"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in summary.itertuples(index=False):
        table.add_row(r.method, str(r.n_seeds), pm(r.auc_mean, r.auc_std), pm(r.auprc_mean, r.auprc_std),
                      f"{r.val_auc_mean:.3f}", f"{r.seconds_mean:.0f}")
    return table
