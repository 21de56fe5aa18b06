"""``salad-med serve``: a DICOM C-STORE node that scores received radiographs (see :mod:`salad_med.dicom.node`)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from salad_med.cli.app import app, cli_errors
from salad_med.log import get_logger


def run_node(run_dir: Path, settings, stop_event: threading.Event | None = None, route: dict | None = None) -> None:
    """Load the run, start the node (and the Orthanc router when ``route`` holds its
    :class:`~salad_med.dicom.orthanc.OrthancRouter` arguments), block until SIGTERM/SIGINT (or
    ``stop_event``), then drain."""
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

    router = None
    if route:
        from salad_med.dicom.orthanc import OrthancRouter, OrthancUnreachable

        router = OrthancRouter(node=node, **route)
        try:
            router.check()  # bad credentials, undeclared modality: fail before listening
        except OrthancUnreachable as err:  # Orthanc restarting too: start anyway, the router retries
            log.warning("%s; routing starts when it answers", err)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.start()
        if router is not None:
            router.start()
            log.info("routing %s instances from %s (modality %r)", "/".join(sorted(router.modalities)),
                     router.url, router.modality)
        while not stop_event.wait(0.5):
            pass
        if router is not None:
            router.stop()
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
    study_quiet: Annotated[float, typer.Option(
        "--study-quiet", min=0, help="Emit one study SR once a study has been quiet this many seconds "
                                     "(0: no study SR).")] = 0.0,
    study_score: Annotated[str, typer.Option(
        "--study-score", help="Study score: max (most abnormal image) or mean of its images.")] = "max",
    route_from: Annotated[str | None, typer.Option(
        "--route-from", help="Orthanc REST URL: follow its change log and have it send every new CR/DX "
                             "instance to this node (survives restarts of either).")] = None,
    route_modality: Annotated[str, typer.Option(
        "--route-modality", help="This node's identifier in Orthanc's DicomModalities.")] = "salad",
    route_user: Annotated[str | None, typer.Option(
        "--route-user", help="Orthanc REST user (HTTP basic); the password is read from --route-password-env.")] = None,
    route_password_env: Annotated[str, typer.Option(
        "--route-password-env", help="Environment variable holding the Orthanc REST password.")
    ] = "SALAD_MED_ORTHANC_PASSWORD",
    route_token_env: Annotated[str | None, typer.Option(
        "--route-token-env", help="Environment variable holding a bearer token for the Orthanc REST API.")] = None,
    ca_bundle: Annotated[Path | None, typer.Option(
        "--ca-bundle", help="PEM CA certificates to trust for --route-from over https.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Do not verify --route-from's TLS certificate (unsafe; warns).")] = False,
) -> None:
    """Run a DICOM Storage SCP that scores CR/DX/SC images and writes (and forwards) DICOM SRs.

    Stop with SIGTERM or Ctrl-C: the queue is drained first (a second signal stops at once; the rest is
    scored at the next start). With --route-from the node asks an Orthanc archive for its new CR/DX
    instances itself (see docs/pacs.md); --study-quiet adds one study SR per study.
    """
    with cli_errors():
        from salad_med.dicom.node import ForwardTarget, NodeSettings

        extra = {"series_description": series_description} if series_description else {}
        settings = NodeSettings(
            output_dir=output, allowed_aets=tuple(allow), ae_title=ae_title, host=host, port=port,
            workers=workers, batch_size=batch_size, forward_retries=forward_retries,
            forward=ForwardTarget.parse(forward) if forward else None,
            algorithm_parameters=[f"run={Path(run).resolve().name}"], study_quiet_s=study_quiet,
            study_aggregate=study_score, **extra,
        )
        route = None
        if route_from:
            from salad_med.dicom.dicomweb import HttpAuth, http_session

            auth = HttpAuth(user=route_user, password_env=route_password_env, token_env=route_token_env,
                            insecure=insecure, ca_bundle=ca_bundle)
            http_session(route_from, auth)  # a missing password or CA bundle fails now, before the model loads
            route = {"url": route_from, "modality": route_modality, "auth": auth}
        run_node(run, settings, route=route)
