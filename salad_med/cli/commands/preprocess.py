"""``salad-med preprocess``: radiographs -> 512x512 PNG + body-part mask, manifest and failure log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors

__all__ = ["preprocess"]


@app.command()
def preprocess(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="mura, nih, folder or dicom.")],
    input_path: Annotated[Path, typer.Option(
        "--input", "-i", help="MURA-v1.1 root | NIH images folder (or Data_Entry_2017.csv) | folder | DICOM tree.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (images/, masks/, manifest.csv).")],
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Output side in pixels (default 512; nih 256).")] = None,
    bit_depth: Annotated[int | None, typer.Option("--bit-depth", help="Bits of the written PNGs: 8 or 16.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo inputs whose outputs already exist.")] = False,
    preview: Annotated[int, typer.Option("--preview", min=0, help="Contact sheet of N images: id and label over original | mask | output, in a grid.")] = 0,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="folder: CSV path,label[,patient_id,body_part]; dicom: CSV sop_instance_uid|path,label; "
                         "nih: Data_Entry_2017.csv.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Process only part i of n (i/n, 1 <= i <= n).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Preprocess radiographs (DICOM, PNG, JPEG) for SALAD: read, fix polarity, normalise, crop to the
    carrier, segment the body part, resize the long side and pad to a square.

    \b
    Writes OUTPUT/images/<image_id>.png, OUTPUT/masks/<image_id>.png, OUTPUT/manifest.csv (one row per
    input), OUTPUT/failures.csv (source_path, reason) and OUTPUT/config.yaml. Re-running skips finished
    inputs. Exit code 0 when at least one input succeeded (failures are listed), 1 when none did,
    2 for bad arguments.
    """
    with cli_errors():
        from salad_med.config import load_config
        from salad_med.data.preprocess_job import parse_shard, run_preprocess
        from salad_med.errors import ConfigError, DataError

        if dataset not in ("mura", "nih", "folder", "dicom"):
            msg = f"--dataset {dataset!r}: expected mura, nih, folder or dicom"
            raise ConfigError(msg)
        overrides = list(set_ or []) + [f"data.dataset={dataset}"]
        if config is None and dataset == "nih":
            config = "nih"  # configs/nih.yaml: 256x256, no carrier, no segmentation (the paper's chest setting)
        for key, value in (("size", size), ("bit_depth", bit_depth), ("workers", workers)):
            if value is not None:
                overrides.append(f"preprocess.{key}={value}")
        cfg = load_config(config, overrides)
        summary = run_preprocess(dataset, input_path, output, cfg, labels=labels, force=force, preview=preview,
                                 shard=parse_shard(shard))
        typer.echo(summary.line())
        if summary.preview_path is not None:
            typer.echo(f"preview: {summary.preview_path}")
        if summary.succeeded == 0:
            msg = f"no input could be preprocessed ({summary.failed} failed; reasons in {summary.failures_path})"
            raise DataError(msg)
