"""CLI basics: help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


def _help_text(output: str) -> str:
    """The help output without box characters and whitespace (so wrapped words join up again)."""
    return "".join(ch for ch in output if not ch.isspace() and ch not in "│╭╮╰╯─")


# (command, terminal width, a help text that must appear whole). At 80 columns `compare` cut its default
# method list and `preprocess`/`split` their CSV layouts and config keys; at 60 `train` cut paths.
HELP_CASES = [
    (["train"], 80, "Record missing/unreadable files in RUN_DIR/skipped.csv and drop them."),
    (["train"], 60, "Record missing/unreadable files in RUN_DIR/skipped.csv and drop them."),
    (["compare"], 80, "[default: salad,dae,memdae,salad_no_rec,salad_no_agg,deep_svdd]"),
    (["split"], 80, "(default: config split.anomalous_ratio, 0.05)."),
    (["preprocess"], 80, "folder: CSV path,label[,patient_id,body_part]"),
    ([], 80, "Build, check and merge image manifests (one row per image)."),
]


@pytest.mark.parametrize(("command", "columns", "sentence"), HELP_CASES,
                         ids=[f"{'-'.join(c) or 'root'}@{w}" for c, w, _ in HELP_CASES])
def test_help_is_never_cut_at_narrow_terminals(command, columns, sentence):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    assert max(len(line) for line in result.output.splitlines()) <= columns  # still fits the terminal
    assert "".join(sentence.split()) in _help_text(result.output), result.output
