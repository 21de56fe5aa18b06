"""``salad-med manifest build|check|merge``: image manifests for MURA, NIH, folders and DICOM trees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors

__all__ = ["manifest_app"]

manifest_app = typer.Typer(help="Build, check and merge image manifests (one row per image).",
                           no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


def _describe(df) -> str:
    labels = df["label"].value_counts().to_dict()
    return (f"{len(df)} images, {df['patient_id'].nunique()} patients, {df['body_part'].nunique()} body parts; "
            f"normal {labels.get(0, 0)}, abnormal {labels.get(1, 0)}, unknown {labels.get(-1, 0)}")


@manifest_app.command("build")
def build(
    dataset: Annotated[str, typer.Argument(help="mura, nih, folder or dicom.")],
    source: Annotated[Path, typer.Argument(help="MURA-v1.1 root | Data_Entry_2017.csv | folder | DICOM tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output manifest CSV.")],
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="folder: labels CSV (path,label[,patient_id,body_part]); dicom: CSV sop_instance_uid|path,label.")] = None,
    images_dir: Annotated[Path | None, typer.Option(
        "--images-dir", help="nih: folder searched for the PNGs (default: the CSV's folder).")] = None,
    train_val_list: Annotated[Path | None, typer.Option("--train-val-list", help="nih: official train_val_list.txt.")] = None,
    test_list: Annotated[Path | None, typer.Option("--test-list", help="nih: official test_list.txt.")] = None,
    body_part: Annotated[str, typer.Option("--body-part", help="folder: body part when the CSV has none.")] = "unknown",
    check_files: Annotated[bool, typer.Option("--check-files/--no-check-files", help="Check that every file exists.")] = True,
) -> None:
    """Build a manifest (image_id, source_path, patient_id, body_part, study, label, ...) and write it atomically.

    \b
    mura:   MURA-v1.1 root (official *_image_paths.csv + *_labeled_studies.csv, else the folder tree)
    nih:    Data_Entry_2017.csv (+ --images-dir, --train-val-list, --test-list)
    folder: normal/ + abnormal/ sub-folders, or --labels CSV (or SOURCE/labels.csv)
    dicom:  any tree of DICOM files (headers only; --labels keyed by SOP Instance UID or path)
    """
    with cli_errors():
        from salad_med.data.manifests import build_manifest, write_manifest
        from salad_med.errors import ConfigError

        if dataset not in ("mura", "nih", "folder", "dicom"):
            msg = f"unknown dataset {dataset!r} (expected mura, nih, folder or dicom)"
            raise ConfigError(msg)
        df = build_manifest(dataset, source, labels=labels, images_dir=images_dir, train_val_list=train_val_list,
                            test_list=test_list, body_part=body_part, check_files=check_files)
        write_manifest(df, out)
        typer.echo(f"wrote {out}: {_describe(df)}")


@manifest_app.command("check")
def check(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    check_files: Annotated[bool, typer.Option("--check-files/--no-check-files", help="Check that every file exists.")] = True,
) -> None:
    """Validate a manifest: required columns, dtypes, unique image_id, existing files (and split invariants)."""
    with cli_errors():
        from salad_med.data.manifests import load_manifest
        from salad_med.data.splits import check_split

        df = load_manifest(manifest, check_files=check_files)
        if "split" in df.columns:
            check_split(df)
        typer.echo(f"ok {manifest}: {_describe(df)}")


@manifest_app.command("merge")
def merge(
    inputs: Annotated[list[Path], typer.Argument(help="Shard manifests manifest.shard-i-of-n.csv, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged manifest CSV.")],
    failures_out: Annotated[Path | None, typer.Option(
        "--failures-out", help="Merged failure log (default: failures.csv beside OUT).")] = None,
    check_files: Annotated[bool, typer.Option("--check-files/--no-check-files", help="Check that every file exists.")] = False,
) -> None:
    """Join the shards of `salad-med preprocess --shard i/n` (and their failures.shard-i-of-n.csv).

    Refuses gaps (every shard 1..n or 0..n-1 must be there) and overlaps (an image_id or source_path
    in two shards).
    """
    with cli_errors():
        from preprocessing.atomic import atomic_write_text
        from salad_med.data.manifests import merge_shards, write_manifest

        df, failures = merge_shards(inputs, check_files=check_files)
        write_manifest(df, out)
        failures_out = failures_out or out.with_name("failures.csv")
        atomic_write_text(failures_out, failures.to_csv(index=False, lineterminator="\n"))
        typer.echo(f"wrote {out}: {_describe(df)}; {len(failures)} failures in {failures_out}")
