"""``salad-med score``: anomaly scores of image files/folders with a trained run's preprocessing and model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors

__all__ = ["score", "score_inputs", "score_archive"]


def _rank(df) -> None:
    """Add the ``rank`` column (1 = most abnormal raw score; failed rows have none)."""
    ok = df["status"] == "ok"
    df["rank"] = df["raw_score"].where(ok).rank(ascending=False, method="min").astype("Int64")


def _write_scores(df, output: Path, model, shown=None, map_kind: str | None = None) -> None:
    """``scores.csv`` (atomically, with a ``rank`` column: 1 = most abnormal raw score), ``config.yaml`` and
    the ranked ``report.html`` (with the maps in ``shown`` when given)."""
    from preprocessing.atomic import atomic_path
    from salad_med.config import save_config
    from salad_med.evaluation.report import score_report

    if "rank" not in df:
        _rank(df)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "scores.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")
    save_config(model.cfg, output / "config.yaml")
    score_report(output / "report.html", model, df, shown, map_kind)


def score_inputs(run: Path, inputs: list[Path], output: Path, checkpoint: str = "best", study_score: str = "max",
                 maps: bool = False, map_kind: str = "auto"):
    """Score ``inputs`` and write ``output/scores.csv`` (atomically, with a ``rank`` column: 1 = most
    abnormal raw score), one DICOM SR per DICOM input under ``output/sr``, the study ranking
    ``output/studies.csv`` with one study SR per DICOM study under ``output/study_sr``
    (:func:`salad_med.dicom.study.triage_studies`), the run's resolved ``output/config.yaml`` and the ranked
    ``output/report.html``; with ``maps``, each input's anomaly map under ``output/maps`` (DICOM: a
    Segmentation the SR references; columns ``map_path``, ``map_max``). Returns the DataFrame."""
    from salad_med.dicom.sr import write_score_srs
    from salad_med.dicom.study import triage_studies
    from salad_med.evaluation.inference import load_run
    from salad_med.evaluation.maps import check_map_kind, write_file_maps

    model = load_run(run, checkpoint)
    if maps:
        check_map_kind(model, map_kind)
    df = model.score_paths(inputs)
    _rank(df)
    shown = None
    if maps:
        df["map_path"], df["map_max"], shown = write_file_maps(model, df, output / "maps", map_kind)
    df["sr_path"] = write_score_srs(df, output / "sr")
    triage_studies(df, output, study_score)
    _write_scores(df, output, model, shown, map_kind if maps else None)
    return df


def score_archive(run: Path, url: str, output: Path, auth, *, study_uids: list[str], since: str | None,
                  stow: bool, checkpoint: str = "best", study_score: str = "max"):
    """Score the CR/DX studies of a DICOMweb archive (:func:`salad_med.dicom.dicomweb.score_dicomweb`) and
    write ``scores.csv``, ``studies.csv``, the SRs and ``config.yaml`` under ``output``; returns the result."""
    from salad_med.dicom.dicomweb import find_studies, open_client, score_dicomweb
    from salad_med.dicom.study import write_studies_csv
    from salad_med.errors import DataError
    from salad_med.evaluation.inference import load_run

    client = open_client(url, auth)
    studies = find_studies(client, study_uids, since)  # credentials, TLS, unknown study: fail before loading
    if not studies:
        msg = f"{url}: no study dated {since} or later"
        raise DataError(msg)
    model = load_run(run, checkpoint)
    result = score_dicomweb(model, client, output, study_uids=studies, stow=stow, how=study_score,
                            algorithm_parameters=[f"run={Path(run).resolve().name}"])
    _write_scores(result.scores, output, model)
    write_studies_csv(result.studies, output / "studies.csv")
    return result


@app.command()
def score(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory of `salad-med train`.")],
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="PNG/JPEG/DICOM files or folders (searched recursively); none with --dicomweb.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of scores.csv.")] = Path("."),
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, last or a .pt path.")] = "best",
    top: Annotated[int, typer.Option("--top", min=0, help="Print the N most abnormal images (0: none).")] = 10,
    maps: Annotated[bool, typer.Option("--maps", help="Also write each input's anomaly map (DICOM: a "
                                                      "Segmentation referenced by the SR) under OUTPUT/maps.")] = False,
    map_kind: Annotated[str, typer.Option("--map-kind", help="auto (the method's default), occlusion, "
                                                             "reconstruction or native.")] = "auto",
    study_score: Annotated[str, typer.Option(
        "--study-score", help="Study score: max (most abnormal image, default) or mean of its images.")] = "max",
    dicomweb: Annotated[str | None, typer.Option(
        "--dicomweb", help="DICOMweb root URL (e.g. https://pacs/dicom-web): score its CR/DX studies.")] = None,
    study: Annotated[list[str] | None, typer.Option(
        "--study", help="With --dicomweb: StudyInstanceUID to score (repeatable).")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="With --dicomweb: score the studies dated on or after YYYY-MM-DD.")] = None,
    stow: Annotated[bool, typer.Option(
        "--stow", help="With --dicomweb: store the SRs back (STOW-RS), skipping those already there.")] = False,
    user: Annotated[str | None, typer.Option(
        "--user", help="HTTP basic user; the password is read from --password-env.")] = None,
    password_env: Annotated[str, typer.Option(
        "--password-env", help="Environment variable holding the HTTP basic password.")] = "SALAD_MED_DICOMWEB_PASSWORD",
    token_env: Annotated[str | None, typer.Option(
        "--token-env", help="Environment variable holding a bearer token.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Do not verify the server's TLS certificate (unsafe; warns).")] = False,
    ca_bundle: Annotated[Path | None, typer.Option(
        "--ca-bundle", help="PEM file of CA certificates to trust (private CA).")] = None,
) -> None:
    """Score images (training preprocessing applied): scores.csv with image_id, source_path, score in
    [0, 1] (fraction of validation normal images scoring lower; higher = more abnormal), raw_score, rank,
    ood and ood_reason (out of distribution: body part or embedding unlike the training images),
    status (ok|failed) and the reason of each failure; studies.csv ranks the studies (DICOM
    StudyInstanceUID, else the image folder) from most to least abnormal; report.html ranks the images
    with thumbnails (and anomaly maps with --maps).

    With --dicomweb the images come from a DICOMweb archive (QIDO-RS, WADO-RS) and --stow stores the SRs
    back (STOW-RS). Secrets are read from environment variables, never from the command line.

    Exit code 0 when at least one input was scored, 1 when none could be, 2 for bad options.
    """
    with cli_errors():
        import pandas as pd

        from salad_med.errors import ConfigError, DataError

        if study_score not in ("max", "mean"):
            msg = f"--study-score {study_score!r}: expected max or mean"
            raise ConfigError(msg)
        if dicomweb:
            from salad_med.dicom.dicomweb import HttpAuth

            if inputs:
                msg = "give input files or --dicomweb, not both"
                raise ConfigError(msg)
            if maps:
                msg = "--maps needs local files: the images retrieved with --dicomweb are not kept"
                raise ConfigError(msg)
            auth = HttpAuth(user=user, password_env=password_env, token_env=token_env, insecure=insecure,
                            ca_bundle=ca_bundle)
            result = score_archive(run, dicomweb, output, auth, study_uids=list(study or []), since=since,
                                   stow=stow, checkpoint=checkpoint, study_score=study_score)
            df = result.scores
        else:
            if study or since or stow:
                msg = "--study, --since and --stow need --dicomweb"
                raise ConfigError(msg)
            if not inputs:
                msg = "give input files or folders (or --dicomweb URL)"
                raise ConfigError(msg)
            df = score_inputs(run, inputs, output, checkpoint, study_score, maps=maps, map_kind=map_kind)
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
        studies = pd.read_csv(output / "studies.csv", dtype={"study": str}) if len(df) else []
        if len(studies):
            typer.echo(f"{len(studies)} studies ranked by {study_score} image score in {output / 'studies.csv'}; "
                       f"most abnormal: {studies['study'].iloc[0]} ({studies['score'].iloc[0]:.3f})")
        if dicomweb and stow:
            typer.echo(f"stored {result.n_stored} SR(s) with STOW-RS")
        typer.echo(f"scored {len(df) - len(failed)} of {len(df)} inputs ({len(failed)} failed); "
                   f"wrote {output / 'scores.csv'} and {output / 'report.html'}")
        if len(df) == 0 or len(failed) == len(df):
            msg = "no input could be scored" if len(df) else "no input file found"
            if dicomweb and not len(df):
                msg = f"no CR/DX image in the selected studies of {dicomweb}"
            raise DataError(msg)
