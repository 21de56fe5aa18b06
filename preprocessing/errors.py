"""Errors raised by the readers and transforms of :mod:`preprocessing`."""

from __future__ import annotations

import os

__all__ = ["ReadError"]


class ReadError(ValueError):
    """An input file cannot be turned into a radiograph; the message names the file and the reason.

    Attributes:
        path: the file that failed (``str``).
        reason: why, in words a person understands (no file name), e.g. ``"empty file (0 bytes)"``;
            this is what ``salad-med preprocess`` writes to ``failures.csv``.

    Example:
        >>> err = ReadError("a.png", "empty file (0 bytes)")
        >>> str(err)
        'a.png: empty file (0 bytes)'
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process pools (pickling)
        return (type(self), (self.path, self.reason))
