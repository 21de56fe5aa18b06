"""Exception types shared by the library and the CLI.

Library code raises these; only :mod:`salad_med.cli.app` turns them into one-line messages and exit codes
(2 for bad arguments or configuration, 1 for failures).
"""

from __future__ import annotations

__all__ = ["SaladMedError", "ConfigError", "DataError", "CheckpointError", "DegenerateScoreError", "RunExistsError"]


class SaladMedError(Exception):
    """Base class of every error salad-med raises on purpose (CLI exit code 1)."""


class ConfigError(SaladMedError, ValueError):
    """A configuration file, override or command-line argument is invalid (CLI exit code 2)."""


class DataError(SaladMedError):
    """Input data (a manifest, an image, a split) is missing or inconsistent."""


class CheckpointError(SaladMedError):
    """A checkpoint is missing, corrupted or from another architecture/config."""


class DegenerateScoreError(SaladMedError):
    """Scores with no spread (constant, near-constant or non-finite): no metric, selection or output."""


class RunExistsError(SaladMedError):
    """The output folder already holds a finished run (CLI exit code 2: pass --resume or --overwrite)."""
