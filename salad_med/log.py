"""One logger for salad-med and progress bars for every loop a person waits for.

Never log patient names or other PHI: log image ids and SOP Instance UIDs only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["get_logger", "configure_logging", "progress", "is_quiet"]

T = TypeVar("T")
_LOGGER_NAME = "salad_med"
_state = {"quiet": False}


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger (``salad_med``) or one of its children."""
    return logging.getLogger(_LOGGER_NAME if not name else f"{_LOGGER_NAME}.{name}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap and close it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; always follow sys.stderr
        pass


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Set up stderr logging once: INFO by default, DEBUG with ``verbose``, WARNING with ``quiet``."""
    _state["quiet"] = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = get_logger()
    logger.setLevel(level)
    if not any(getattr(h, "_salad_med", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._salad_med = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def is_quiet() -> bool:
    """True when ``--quiet`` was given (progress bars are hidden)."""
    return _state["quiet"]


def progress(iterable: Iterable[T], description: str = "", total: int | None = None,
             disable: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a rich progress bar on stderr (hidden with ``--quiet`` or when not a TTY)."""
    if disable is None:
        disable = is_quiet() or not sys.stderr.isatty()
    if disable:
        yield from iterable
        return
    from rich.progress import track

    yield from track(iterable, description=description, total=total, transient=True)
