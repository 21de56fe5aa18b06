"""The ``salad-med`` command line (typer).

Commands live in :mod:`salad_med.cli.commands` and register themselves on :data:`app`; each stays thin
and calls library code. Library code raises; :func:`cli_errors` turns errors into one line on stderr
and an exit code: 2 for bad arguments/config, 1 for failures (full traceback with ``--verbose``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Annotated

import typer

from salad_med import __version__
from salad_med.errors import ConfigError, RunExistsError
from salad_med.log import configure_logging, get_logger

__all__ = ["app", "main", "cli_errors", "describe_os_error", "ConfigOption", "SetOption"]

app = typer.Typer(
    name="salad-med",
    help="SALAD anomaly detection on X-rays: preprocess, split, train, evaluate, score, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"verbose": False}

#: Shared ``--config`` / ``--set`` options for every command that takes a config.
ConfigOption = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML config file (or a name in configs/, e.g. 'demo').")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]


def _fold_long_help_words() -> None:
    """Make ``--help`` wrap long words instead of cutting them with "…", at any terminal width.

    typer renders help as rich tables whose columns default to ``overflow="ellipsis"``: an option
    default, path or ``section.key=value`` longer than the help column was cut. The console typer
    builds for help now renders every cell with ``overflow="fold"`` (a too-long word continues on the
    next line), so help text is always complete and the table layout is kept. typer has no public
    setting for this; if its console factory moves, help renders as before (tests/salad_med/cli/
    test_app.py catches it).
    """
    try:
        from typer import rich_utils
    except ImportError:  # typer without rich: click's plain help does not cut words
        return
    make_console = getattr(rich_utils, "_get_rich_console", None)
    if make_console is None or getattr(make_console, "_salad_folds", False):
        return

    def _folding_console(*args, **kwargs):
        console = make_console(*args, **kwargs)
        render_lines = console.render_lines

        def _render_lines(renderable, options=None, *rest, **kw):
            options = options or console.options
            if options.overflow in (None, "ellipsis"):
                options = options.update(overflow="fold")
            return render_lines(renderable, options, *rest, **kw)

        console.render_lines = _render_lines
        return console

    _folding_console._salad_folds = True
    rich_utils._get_rich_console = _folding_console


_fold_long_help_words()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"salad-med {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only; no progress bars.")] = False,
) -> None:
    """SALAD anomaly detection on X-rays (Bozorgtabar et al., MICCAI 2020) on MONAI."""
    _state["verbose"] = verbose
    configure_logging(verbose=verbose, quiet=quiet)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library exceptions into one clear line and an exit code (2 config/arguments, 1 failure)."""
    log = get_logger()
    try:
        yield
    except typer.Exit:
        raise
    except (ConfigError, RunExistsError) as err:
        if _state["verbose"]:
            log.exception("configuration error")
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(code=2) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except OSError as err:  # read-only or full folder, a file where a folder should be, ...
        if _state["verbose"]:
            log.exception("failure")
        typer.secho(f"error: {describe_os_error(err)}", err=True, fg="red")
        raise typer.Exit(code=1) from None
    except Exception as err:  # noqa: BLE001 - the CLI boundary reports every failure in one line
        if _state["verbose"]:
            log.exception("failure")
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(code=1) from None


def describe_os_error(err: OSError) -> str:
    """``PATH: reason`` for a file-system error (``[Errno 17] File exists: 'x'`` -> ``x: exists and is not a
    folder``)."""
    if err.filename is None:
        return str(err)
    path = os.fsdecode(err.filename)
    reason = err.strerror or str(err)
    if isinstance(err, FileExistsError) and os.path.exists(path) and not os.path.isdir(path):
        reason = "exists and is not a folder"
    elif isinstance(err, NotADirectoryError):
        reason = "a part of this path is a file, not a folder"
    if err.filename2 is not None:
        path = f"{path} -> {os.fsdecode(err.filename2)}"
    return f"{path}: {reason}"


def _register_commands() -> None:
    """Import every command module; each registers its commands on :data:`app`."""
    import importlib
    import pkgutil

    import salad_med.cli.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"salad_med.cli.commands.{info.name}")


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()
