"""``salad-med evaluate``: AUC, AUPRC with bootstrap 95 % CIs, ROC/PR curves and a per-body-part table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors

__all__ = ["evaluate", "print_evaluation"]


def print_evaluation(result: dict) -> None:
    """Print the metrics and per-body-part table of :func:`salad_med.evaluation.evaluate.evaluate_run`."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lo, hi = result["auc_ci95"]
    plo, phi = result["auprc_ci95"]
    console.print(f"{result['method']} on {result['split']} ({result['n']} images, {result['n_abnormal']} abnormal): "
                  f"AUC {result['auc']:.4f} [95% CI {lo:.4f}-{hi:.4f}], "
                  f"AUPRC {result['auprc']:.4f} [95% CI {plo:.4f}-{phi:.4f}]")
    table = Table(title="per body part")
    for col in ("body_part", "n", "n_abnormal", "auc", "auprc"):
        table.add_column(col, justify="left" if col == "body_part" else "right")
    for row in result["per_body_part"]:
        table.add_row(str(row["body_part"]), str(row["n"]), str(row["n_abnormal"]),
                      *("-" if v is None or v != v else f"{v:.4f}" for v in (row["auc"], row["auprc"])))
    console.print(table)
    t = result.get("threshold")
    if t:
        c = t[result["split"]]
        console.print(f"threshold (Youden's J on val): raw score >= {t['raw']:.6g} (score {t['score']:.3f}); on "
                      f"{result['split']}: sensitivity {c['sensitivity']:.3f}, specificity {c['specificity']:.3f} "
                      f"({c['fp']} false positives, {c['fn']} false negatives)")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory of `salad-med train`.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: test, val or train.")] = "test",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder "
                                                                       "(default RUN_DIR/eval-SPLIT).")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Split manifest (default: the one "
                                                                           "the run was trained on).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, last or a .pt path.")] = "best",
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap replicates of the 95% CIs.")] = 1000,
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="Anomaly maps on the report's images "
                                                                "(up to 84 images).")] = True,
    map_kind: Annotated[str, typer.Option("--map-kind", help="auto (the method's default), occlusion, "
                                                             "reconstruction or native.")] = "auto",
) -> None:
    """Score a split with the run's best checkpoint: metrics.json (with the threshold chosen on val by
    Youden's J), scores.csv, roc.png, pr.png, per_body_part.csv and report.html (one self-contained page:
    curves, distributions, the top/bottom images and the threshold's errors with their anomaly maps)."""
    with cli_errors():
        from salad_med.errors import ConfigError
        from salad_med.evaluation.evaluate import evaluate_run

        if split not in ("train", "val", "test"):
            msg = f"--split {split!r}: choose train, val or test"
            raise ConfigError(msg)
        if n_boot < 1:
            msg = f"--n-boot must be >= 1, got {n_boot}"
            raise ConfigError(msg)
        result = evaluate_run(run, split, output, manifest=manifest, checkpoint=checkpoint, n_boot=n_boot,
                              map_kind=map_kind if maps else None)
        print_evaluation(result)
        typer.echo(f"wrote {result['output']}/metrics.json, scores.csv, per_body_part.csv, roc.png, pr.png")
        typer.echo(f"report: {result['report']}")
