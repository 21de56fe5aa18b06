"""``salad-med compare``: the Table 1 rows (SALAD, baselines, ablations) x seeds on one split, same budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors

__all__ = ["compare", "run_compare", "summarise_runs", "format_table"]

_METHODS = ("salad", "dae", "memdae", "salad_no_rec", "salad_no_agg", "deep_svdd")


def run_compare(manifest: str | Path, methods: Sequence[str], seeds: Sequence[int], output: str | Path,
                config: str | None = None, overrides: Sequence[str] | None = None, *, n_boot: int = 200,
                split: str = "test", on_run=None):
    """Train and evaluate every method x seed with one config (same epochs, batch and steps).

    Args:
        manifest: split manifest.
        methods: ``train.method`` values.
        seeds: ``seed`` values.
        output: folder: ``runs/<method>/seed<k>/``, ``runs.csv``, ``compare.csv``.
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
    from salad_med.evaluation.inference import evaluate_run

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
            ev = evaluate_run(run_dir, split, run_dir / f"eval-{split}", n_boot=n_boot, seed=seed, plots=False)
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
    return runs, summary


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


@app.command()
def compare(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Split manifest (`salad-med split`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of runs/, runs.csv and compare.csv.")],
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: " + ",".join(_METHODS))]
    = ",".join(_METHODS),
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2",
    config: ConfigOption = None,
    overrides: SetOption = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap replicates per evaluation.")] = 200,
) -> None:
    """Train each method x seed with the same config and budget, evaluate on test, print AUC/AUPRC
    mean ± std per method (the paper's Table 1 layout) and write compare.csv and runs.csv.
    """
    with cli_errors():
        from rich.console import Console

        from salad_med.errors import ConfigError

        names = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in names if m not in _METHODS]
        if not names or bad:
            msg = f"--methods {methods!r}: unknown {bad} (choose from {', '.join(_METHODS)})"
            raise ConfigError(msg)
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            msg = f"--seeds {seeds!r}: expected comma-separated integers"
            raise ConfigError(msg) from None
        if not seed_list:
            msg = "--seeds: give at least one seed"
            raise ConfigError(msg)

        def progress_line(row):
            typer.echo(f"{row['method']} seed {row['seed']}: test AUC {row['test_auc']:.4f}, "
                       f"AUPRC {row['test_auprc']:.4f} (val AUC {row['val_auc']:.4f}, {row['seconds']:.0f} s)")

        _, summary = run_compare(manifest, names, seed_list, output, config, overrides, n_boot=n_boot,
                                 on_run=progress_line)
        Console().print(format_table(summary, f"test split of {manifest.name}, seeds {seeds}"))
        typer.echo(f"wrote {output / 'compare.csv'} and {output / 'runs.csv'}")
