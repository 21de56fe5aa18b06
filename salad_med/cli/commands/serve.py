"""``salad-med serve``: a DICOM C-STORE node that scores received radiographs (see :mod:`salad_med.dicom.node`)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors
from salad_med.log import get_logger


def run_node(run_dir: Path, settings, stop_event: threading.Event | None = None) -> None:
    """Load the run, start the node, block until SIGTERM/SIGINT (or ``stop_event``), then drain."""
    from salad_med.dicom.node import ScoringNode
    from salad_med.evaluation.inference import load_run

    log = get_logger("serve")
    model = load_run(run_dir)
    node = ScoringNode(settings, model.score_paths)
    stop_event = stop_event or threading.Event()
    fast = threading.Event()

    def _on_signal(signum, _frame):
        if stop_event.is_set():  # second signal: stop without draining
            fast.set()
        stop_event.set()
        log.info("received %s: %s", signal.Signals(signum).name,
                 "stopping now" if fast.is_set() else "draining the queue (send again to stop now)")

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.start()
        while not stop_event.wait(0.5):
            pass
        node.stop(drain=not fast.is_set())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("node stopped")


@app.command()
def serve(
    run: Annotated[Path, typer.Option("--run", help="Trained run directory (best.pt, config.yaml).")],
    output: Annotated[Path, typer.Option("--output", help="Node folder: incoming/, done/, sr/, results.csv, "
                                                           "audit.jsonl.")],
    allow: Annotated[list[str], typer.Option("--allow", help="Calling AE title allowed to send (repeatable).")],
    ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title; associations addressed to any "
                                                          "other called AE title are refused.")] = "SALAD",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = 11112,
    host: Annotated[str, typer.Option("--host", help="Bind address (0.0.0.0: all interfaces).")] = "0.0.0.0",
    forward: Annotated[str | None, typer.Option("--forward", help="Send each SR to HOST:PORT:AE.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Scoring threads.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images scored per batch.")] = 8,
    forward_retries: Annotated[int, typer.Option("--forward-retries", min=0,
                                                 help="Extra attempts for a failed forward.")] = 3,
    series_description: Annotated[str | None, typer.Option(
        "--series-description", help="SR Series Description (default: not for clinical use).")] = None,
) -> None:
    """Run a DICOM Storage SCP that scores CR/DX/SC images and writes (and forwards) DICOM SRs.

    Stop with SIGTERM or Ctrl-C: the queue is drained first (a second signal stops at once; the rest is
    scored at the next start).
    """
    with cli_errors():
        from salad_med.dicom.node import ForwardTarget, NodeSettings

        extra = {"series_description": series_description} if series_description else {}
        settings = NodeSettings(
            output_dir=output, allowed_aets=tuple(allow), ae_title=ae_title, host=host, port=port,
            workers=workers, batch_size=batch_size, forward_retries=forward_retries,
            forward=ForwardTarget.parse(forward) if forward else None,
            algorithm_parameters=[f"run={Path(run).resolve().name}"], **extra,
        )
        run_node(run, settings)
