"""``salad-med config show``: every key with value, default, type, allowed values and help."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.config import Config
from salad_med.methods.registry import available_methods, get_method

runner = CliRunner()


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


def _lines_by_key(output: str) -> dict[str, str]:
    """The listing's lines keyed by their first word (the dotted key)."""
    return {line.split()[0]: line for line in output.splitlines()
            if line.strip() and not line.startswith("#")}


def _show(*args: str):
    result = runner.invoke(app, ["config", "show", *args])
    assert result.exit_code == 0, result.output
    return result


def test_every_config_key_is_listed_with_its_help():
    lines = _lines_by_key(_show().output)
    for key, f in _leaf_fields(Config):
        assert key in lines, f"{key} missing from `config show`"
        help_text = f.metadata.get("help", "")
        assert help_text, f"{key} has no help text"
        assert help_text in lines[key]  # the one-line meaning, never cut


def test_values_types_and_ranges():
    result = _show("--config", "demo", "--set", "train.lr=0.003", "--set", "data.skip_missing=true")
    lines = _lines_by_key(result.output)
    lr = lines["train.lr"].split()
    assert lr[1] == "0.003" and lr[2] == "0.0001" and lr[3] == "float"  # value (from --set), default, type
    assert "> 0" in lines["train.lr"] and ">= 0" not in lines["train.lr"]  # lr must be strictly positive
    assert "<= 1" in lines["train.lr"]
    assert lines["data.skip_missing"].split()[1:4] == ["true", "false", "bool"]
    assert lines["model.arch"].split()[1] == "conv6"  # from configs/demo.yaml
    assert "conv6|resnet18" in lines["model.arch"]  # choices
    assert ">= 16" in lines["data.image_size"] and "<= 4096" in lines["data.image_size"]


def test_method_params_are_listed():
    with_params = next(n for n in available_methods() if get_method(n).Params is not None)
    lines = _lines_by_key(_show("--method", with_params, "--set", "train.k=7").output)
    assert lines["train.method"].split()[1] == with_params
    assert lines["train.k"].split()[1] == "7"
    for key, f in _leaf_fields(get_method(with_params).Params, "params."):
        assert key in lines and f.metadata["help"] in lines[key]
    # a method without Params: one `params` row saying so
    lines = _lines_by_key(_show().output)
    assert "takes none" in lines["params"]


def test_methods_lists_registered_methods():
    result = _show("--methods")
    lines = _lines_by_key(result.output)
    for name in ("salad", "dae"):
        assert name in lines
        assert get_method(name).title in lines[name] and get_method(name).paper in lines[name]
    assert set(available_methods()) <= set(lines)


@pytest.mark.parametrize(("args", "needle"), [
    (["--method", "no_such_method"], "no_such_method"),
    (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.nope=1"], "train.nope"),
])
def test_bad_arguments_exit_2_naming_the_key(args, needle):
    result = runner.invoke(app, ["config", "show", *args])
    assert result.exit_code == 2 and needle in result.output
