"""CLI basics: help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from salad_med import __version__
from salad_med.cli.app import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"salad-med {__version__}"


def test_help_lists_global_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in ("--version", "--verbose", "--quiet"):
        assert option in result.stdout


def test_unknown_command_is_usage_error():
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "salad_med", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout
