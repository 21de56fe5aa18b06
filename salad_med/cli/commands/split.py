"""``salad-med split``: a leak-free train/val/test split manifest with a known anomalous ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors
from salad_med.data.splits import SPLIT_RULE

__all__ = ["split"]


_SHORT = {"abnormal_images": "abn. images", "normal_groups": "normal", "abnormal_groups": "abnormal",
          "mixed_groups": "mixed", "abnormal_group_fraction": "AR"}


def _print_tables(totals, summary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="split totals (groups: normal / abnormal / mixed; AR = abnormal group fraction)")
    for col in totals.columns:
        table.add_column(_SHORT.get(col, col), justify="left" if col == "split" else "right")
    for row in totals.itertuples(index=False):
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
    detail = Table(title="images and groups per split x label x body part")
    for col in summary.columns:
        detail.add_column(col, justify="right" if col in ("images", "groups") else "left")
    for row in summary.itertuples(index=False):
        detail.add_row(*(str(v) for v in row))
    console.print(detail)


def run_split(manifest: Path, out: Path, *, anomalous_ratio: float | None = None, seed: int | None = None,
              train_fraction: float | None = None, group: str | None = None, split_list: Path | None = None,
              check_files: bool = True, config: str | None = None, overrides: list[str] | None = None,
              show: bool = True):
    """Resolve options (explicit option > ``--set`` > ``--config`` > defaults), split, write, print.

    Returns:
        The split manifest (``pandas.DataFrame``).
    """
    from salad_med.config import load_config
    from salad_med.data.manifests import file_sha256, load_manifest
    from salad_med.data.splits import apply_split_list, make_split, split_summary, split_totals, write_split

    explicit = {"split.anomalous_ratio": anomalous_ratio, "split.train_fraction": train_fraction,
                "split.group": group, "seed": seed}
    cli_overrides = [f"{k}={v}" for k, v in explicit.items() if v is not None]
    cfg = load_config(config, [*(overrides or []), *cli_overrides])
    df = load_manifest(manifest, check_files=check_files)
    parameters = {
        "manifest": str(manifest),
        "manifest_sha256": file_sha256(manifest),
        "manifest_rows": len(df),
        "anomalous_ratio": cfg.split.anomalous_ratio,
        "train_fraction": cfg.split.train_fraction,
        "group": cfg.split.group,
        "seed": cfg.seed,
        "split_list": str(split_list) if split_list is not None else None,
        "split_list_sha256": file_sha256(split_list) if split_list is not None else None,
        "check_files": check_files,
        "config": config,
        "set": list(overrides or []),
    }
    if split_list is not None:
        result = apply_split_list(df, split_list, group=cfg.split.group)
    else:
        result = make_split(df, anomalous_ratio=cfg.split.anomalous_ratio, train_fraction=cfg.split.train_fraction,
                            group=cfg.split.group, seed=cfg.seed)
    csv_path, json_path = write_split(result, out, parameters)
    if show:
        _print_tables(split_totals(result), split_summary(result))
        typer.echo(f"wrote {csv_path} ({len(result)} rows) and {json_path}")
    return result


@app.command(help=f"""Split a manifest into train/val/test by patient x body part (or patient).

\b
Writes OUT: the input rows + split, group_id, known_anomaly, and
OUT.json: every parameter, the seed, the input SHA-256 and the summary
tables (also printed). Same inputs and seed: byte-identical OUT;
another seed: another split.

\b
Rule:
{SPLIT_RULE}

\b
--split-list CSV (image_id,split or path,split) applies a given
assignment instead (e.g. the Tang et al. NIH one-class split) and still
refuses leaks and unassigned rows.
""")
def split(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Input manifest CSV (salad-med manifest build / preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output split manifest CSV (sidecar: OUT.json).")],
    anomalous_ratio: Annotated[float | None, typer.Option(
        "--anomalous-ratio", help="AR: abnormal fraction of the train groups (default: config split.anomalous_ratio, 0.05).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default: config seed, 0).")] = None,
    train_fraction: Annotated[float | None, typer.Option(
        "--train-fraction", help="Fraction of all groups put in train (default: config split.train_fraction, 0.5).")] = None,
    group: Annotated[str | None, typer.Option(
        "--group", help="patient_bodypart (MURA) or patient (NIH) (default: config split.group, patient_bodypart).")] = None,
    split_list: Annotated[Path | None, typer.Option(
        "--split-list", help="CSV image_id,split or path,split: apply this assignment instead.")] = None,
    check_files: Annotated[bool, typer.Option(
        "--check-files/--no-check-files", help="Check that every manifest file exists.")] = True,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    with cli_errors():
        run_split(manifest, out, anomalous_ratio=anomalous_ratio, seed=seed, train_fraction=train_fraction,
                  group=group, split_list=split_list, check_files=check_files, config=config, overrides=set_)
