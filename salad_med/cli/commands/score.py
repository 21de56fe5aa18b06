"""``salad-med score``: anomaly scores of image files/folders with a trained run's preprocessing and model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors

__all__ = ["score", "score_inputs"]


def score_inputs(run: Path, inputs: list[Path], output: Path, checkpoint: str = "best", maps: bool = False,
                 map_kind: str = "auto"):
    """Score ``inputs`` and write ``output/scores.csv`` (atomically, with a ``rank`` column: 1 = most
    abnormal raw score), one DICOM SR per DICOM input under ``output/sr``, the run's resolved
    ``output/config.yaml`` and the ranked ``output/report.html``; with ``maps``, each input's anomaly map
    under ``output/maps`` (DICOM: a Segmentation the SR references; columns ``map_path``, ``map_max``).
    Returns the DataFrame."""
    from preprocessing.atomic import atomic_path
    from salad_med.config import save_config
    from salad_med.dicom.sr import write_score_srs
    from salad_med.evaluation.inference import load_run
    from salad_med.evaluation.maps import check_map_kind, write_file_maps
    from salad_med.evaluation.report import score_report

    model = load_run(run, checkpoint)
    if maps:
        check_map_kind(model, map_kind)
    df = model.score_paths(inputs)
    ok = df["status"] == "ok"
    df["rank"] = df["raw_score"].where(ok).rank(ascending=False, method="min").astype("Int64")
    shown = None
    if maps:
        df["map_path"], df["map_max"], shown = write_file_maps(model, df, output / "maps", map_kind)
    df["sr_path"] = write_score_srs(df, output / "sr")
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "scores.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")
    save_config(model.cfg, output / "config.yaml")
    score_report(output / "report.html", model, df, shown, map_kind if maps else None)
    return df


@app.command()
def score(
    inputs: Annotated[list[Path], typer.Argument(help="PNG/JPEG/DICOM files or folders (searched recursively).")],
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory of `salad-med train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of scores.csv.")] = Path("."),
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, last or a .pt path.")] = "best",
    top: Annotated[int, typer.Option("--top", min=0, help="Print the N most abnormal images (0: none).")] = 10,
    maps: Annotated[bool, typer.Option("--maps", help="Also write each input's anomaly map (DICOM: a "
                                                      "Segmentation referenced by the SR) under OUTPUT/maps.")] = False,
    map_kind: Annotated[str, typer.Option("--map-kind", help="auto (the method's default), occlusion, "
                                                             "reconstruction or native.")] = "auto",
) -> None:
    """Score images (training preprocessing applied): scores.csv with image_id, source_path, score in
    [0, 1] (fraction of validation normal images scoring lower; higher = more abnormal), raw_score, rank,
    ood and ood_reason (out of distribution: body part or embedding unlike the training images),
    status (ok|failed) and the reason of each failure; report.html ranks them with images (and anomaly
    maps with --maps).

    Exit code 0 when at least one input was scored, 1 when none could be.
    """
    with cli_errors():
        from salad_med.errors import DataError

        df = score_inputs(run, inputs, output, checkpoint, maps=maps, map_kind=map_kind)
        failed = df[df["status"] != "ok"]
        for row in failed.itertuples(index=False):
            typer.secho(f"failed: {row.source_path}: {row.reason}", err=True, fg="yellow")
        ranked = df[df["status"] == "ok"].sort_values("rank")
        for row in ranked.head(top).itertuples(index=False):
            flag = f"  OUT OF DISTRIBUTION: {row.ood_reason}" if row.ood else ""
            typer.echo(f"{int(row.rank):4d}  {row.score:.3f}  {Path(row.source_path).name}{flag}")
        n_ood = int(ranked["ood"].sum())
        if n_ood:
            typer.secho(f"warning: {n_ood} image(s) out of distribution: their scores should not be trusted",
                        err=True, fg="yellow")
        typer.echo(f"scored {len(df) - len(failed)} of {len(df)} inputs ({len(failed)} failed); "
                   f"wrote {output / 'scores.csv'} and {output / 'report.html'}")
        if len(df) == 0 or len(failed) == len(df):
            msg = "no input could be scored" if len(df) else "no input file found"
            raise DataError(msg)
