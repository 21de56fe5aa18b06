"""``salad-med compare``: methods x seeds on one split, same budget (library code in
:mod:`salad_med.evaluation.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors
from salad_med.evaluation.compare import TABLE1_METHODS, format_table, run_compare

__all__ = ["compare"]


@app.command()
def compare(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Split manifest (`salad-med split`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of runs/, runs.csv and compare.csv.")],
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated registered methods (salad-med config "
                                                           "show --methods lists them).")]
    = ",".join(TABLE1_METHODS),
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2",
    config: ConfigOption = None,
    overrides: SetOption = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap replicates per evaluation.")] = 200,
) -> None:
    """Train each method x seed with the same config and budget, evaluate on test, print AUC/AUPRC
    mean ± std per method (the paper's Table 1 layout) and write compare.csv, runs.csv and report.html
    (one row per method, curves overlaid).
    """
    with cli_errors():
        from rich.console import Console

        from salad_med.errors import ConfigError
        from salad_med.methods.registry import available_methods

        names = [m.strip() for m in methods.split(",") if m.strip()]
        known = available_methods()
        bad = [m for m in names if m not in known]
        if not names or bad:
            msg = f"--methods {methods!r}: unknown {bad} (choose from {', '.join(known)})"
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
        typer.echo(f"report: {output / 'report.html'}")
