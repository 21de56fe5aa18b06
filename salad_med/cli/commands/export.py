"""``salad-med export``: a trained run as one image -> score module (TorchScript, ONNX, MONAI bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors


@app.command()
def export(
    run: Annotated[Path, typer.Option("--run", help="Trained run directory (best.pt, config.yaml).")],
    format: Annotated[str, typer.Option("--format", help="torchscript | onnx | bundle.")],
    output: Annotated[Path, typer.Option("--output", help="Output file (torchscript, onnx) or folder (bundle).")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, last or a checkpoint path.")] = "best",
) -> None:
    """Export a run: image (B, 1, S, S) in [0, 1] -> anomaly score (B,), checked against the run's scores.

    The MONAI bundle runs offline with
    `python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR`.
    """
    with cli_errors():
        from salad_med.export import export_run

        path = export_run(run, format, output, checkpoint=checkpoint)
        typer.echo(f"{format} export written to {path}")
