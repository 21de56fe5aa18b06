"""``salad-med train``: SALAD (or a Table 1 baseline) on a split manifest, model selection on ``val``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors

__all__ = ["train"]


@app.command()
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (best.pt, last.pt, config.yaml, "
                                                                "metrics.csv, curves.png).")],
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Split manifest from `salad-med split` "
                                                                           "(optional with --resume).")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from RUN_DIR/last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in RUN_DIR (without "
                                                                "--resume or this, an existing run is refused).")] = False,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Record missing/unreadable files in "
                                                                       "RUN_DIR/skipped.csv and drop them.")] = False,
) -> None:
    """Train on the train split, validate every epoch on the val split (never test), keep the best AUC.

    train.method picks the method (SALAD by default: pre-training with L_rec + lambda L_ss, then rounds
    adding L_agg; `salad-med config show --methods` lists the others). Every epoch writes last.pt;
    --resume continues exactly; an existing run is refused (exit 2) unless --resume or --overwrite.
    Runs unchanged under torchrun (DDP; train.batch_size is the global batch; see docs/distributed.md).
    """
    with cli_errors():
        import logging

        from salad_med.engine.distributed import cleanup_distributed, init_distributed
        from salad_med.engine.trainer import resolve_run_config, train_from_manifest
        from salad_med.log import get_logger

        extra = ["data.skip_missing=true"] if skip_missing else []
        cfg = resolve_run_config(output, config, [*(overrides or []), *extra], resume=resume)
        ctx = init_distributed(cfg.train.device)  # no-op unless launched by torchrun
        if not ctx.is_main:  # rank 0 alone logs progress
            get_logger().setLevel(logging.WARNING)
        try:
            if resume and overwrite:
                from salad_med.errors import ConfigError

                msg = "--resume and --overwrite exclude each other"
                raise ConfigError(msg)
            result = train_from_manifest(cfg, manifest, output, resume=resume, overwrite=overwrite)
        finally:
            cleanup_distributed()
        if not ctx.is_main:
            return
        typer.echo(f"trained {cfg.train.method} for {result['epochs']} epochs ({result['steps']} steps, "
                   f"{result['seconds']:.1f} s) on {result['n_train']} train / {result['n_val']} val images; "
                   f"best val AUC {result['best_val_auc']:.4f} at epoch {result['best_epoch']}; run in {output}")
