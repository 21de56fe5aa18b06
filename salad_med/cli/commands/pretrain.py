"""``salad-med pretrain``: pre-train an encoder (SimCLR) on a split manifest; ``train`` with that method."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors

__all__ = ["pretrain", "pretraining_methods"]


def pretraining_methods() -> list[str]:
    """Registered methods whose run holds a pre-trained encoder (``pretrains_encoder = True``)."""
    from salad_med.methods.registry import available_methods, get_method

    return [n for n in available_methods() if getattr(get_method(n), "pretrains_encoder", False)]


@app.command()
def pretrain(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory of the pre-trained encoder.")],
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Split manifest from `salad-med split` "
                                                                           "(optional with --resume).")] = None,
    method: Annotated[str, typer.Option("--method", help="Pre-training method (simclr).")] = "simclr",
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from RUN_DIR/last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in RUN_DIR.")] = False,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Record missing/unreadable files in "
                                                                       "RUN_DIR/skipped.csv and drop them.")] = False,
) -> None:
    """Pre-train an encoder from scratch on the train split, offline (no download, no pretrained weights).

    Equivalent to `salad-med train --set train.method=METHOD` (validation on val, best.pt, exact --resume).
    The run is then a frozen teacher (--set params.teacher_run=RUN_DIR for spade) or the initial encoder
    of an auto-encoder method (--set model.init_from=RUN_DIR for salad, dae, memdae, deep_svdd).
    """
    from salad_med.cli.commands.train import train

    with cli_errors():
        known = pretraining_methods()
        if method not in known:
            from salad_med.errors import ConfigError

            msg = f"--method {method!r} is not a pre-training method (known: {', '.join(known)})"
            raise ConfigError(msg)
    train(output=output, manifest=manifest, config=config, overrides=[*(overrides or []), f"train.method={method}"],
          resume=resume, overwrite=overwrite, skip_missing=skip_missing)
