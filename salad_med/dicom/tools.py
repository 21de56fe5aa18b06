"""Find dcmtk's command-line tools (``storescu``, ``echoscu``, ``dsrdump``...), not look-alikes.

pynetdicom installs console scripts of the same names (``storescu``, ``echoscu``) into the virtual
environment's ``bin/``; they come first on ``PATH`` once the venv is activated but reject dcmtk's options
(``-xv``, ``-xr``, ``+II``) and print other messages. Tests and benchmarks that mean dcmtk call
:func:`dcmtk_tool`, which walks ``PATH`` and keeps the first executable whose ``--version`` names
dcmtk / OFFIS.

Example:
    >>> storescu = dcmtk_tool("storescu")      # "/usr/bin/storescu" or None
    >>> print(dcmtk_missing_reason("storescu"))  # why it is None, naming any look-alike found
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

__all__ = ["dcmtk_tool", "dcmtk_missing_reason", "is_dcmtk", "STORESCU_SYNTAX_OPTIONS", "storescu_groups"]


@functools.cache
def is_dcmtk(path: str) -> bool:
    """True when ``path --version`` prints dcmtk's banner (``$dcmtk: ...`` / OFFIS)."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    text = (proc.stdout + proc.stderr).lower()
    return "dcmtk" in text or "offis" in text


def _candidates(name: str) -> list[str]:
    seen, out = set(), []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder or ".") / name
        real = os.path.realpath(path)
        if real in seen or not (path.is_file() and os.access(path, os.X_OK)):
            continue
        seen.add(real)
        out.append(str(path))
    return out


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """Absolute path of dcmtk's ``name`` on ``PATH`` (skipping pynetdicom's same-named scripts), or None."""
    return next((p for p in _candidates(name) if is_dcmtk(p)), None)


def dcmtk_missing_reason(name: str) -> str:
    """One line saying why :func:`dcmtk_tool` found nothing: absent, or only non-dcmtk look-alikes."""
    others = [p for p in _candidates(name) if not is_dcmtk(p)]
    if not others:
        return f"dcmtk's {name} is not installed (apt-get install dcmtk)"
    return (f"only a non-dcmtk {name} was found ({', '.join(others)}; e.g. pynetdicom's script in a venv): "
            f"install dcmtk (apt-get install dcmtk)")


#: dcmtk ``storescu`` option proposing a file's (compressed) transfer syntax; uncompressed ones need none.
STORESCU_SYNTAX_OPTIONS = {"1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv",
                           "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs",
                           "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.51": "-xx",
                           "1.2.840.10008.1.2.4.50": "-xy"}


def storescu_groups(paths) -> list[tuple[list[str], list[Path]]]:
    """Files grouped by transfer syntax with the ``storescu`` option proposing it: one association per group,
    as a modality or PACS proposes what each file holds (``[(options, files), ...]``)."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for p in paths:
        ts = str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(ts, []).append(Path(p))
    return [([STORESCU_SYNTAX_OPTIONS[ts]] if ts in STORESCU_SYNTAX_OPTIONS else [], files)
            for ts, files in groups.items()]
