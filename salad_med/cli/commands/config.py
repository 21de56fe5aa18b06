"""``salad-med config show``: every config key with its value, default, type, allowed values and meaning.

The keys, types, ranges and help texts come from the config dataclasses (:mod:`salad_med.config`)
and from the selected method's ``Params`` dataclass (the ``params.*`` keys), so the listing can
never drift from what ``load_config`` validates.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any

import typer

from salad_med.cli.app import ConfigOption, SetOption, app, cli_errors

__all__ = ["config_app"]

config_app = typer.Typer(help="Inspect the configuration: every key, its value, range and meaning.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")

_COLUMNS = ("KEY", "VALUE", "DEFAULT", "TYPE", "ALLOWED", "HELP")


def _fmt(value: Any) -> str:
    """A value as it would be written after ``--set key=`` (YAML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, dict):
        return "{}" if not value else ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _allowed(meta: typing.Mapping[str, Any]) -> str:
    """``a|b|c`` for choices, ``> 0, <= 1`` / ``>= 16, <= 4096`` for ranges, ``''`` otherwise."""
    if meta.get("choices") is not None:
        return "|".join(_fmt(c) for c in meta["choices"])
    parts = []
    if meta.get("min") is not None:
        parts.append(f"{'>' if meta.get('exclusive_min') else '>='} {_fmt(meta['min'])}")
    if meta.get("max") is not None:
        parts.append(f"<= {_fmt(meta['max'])}")
    return ", ".join(parts)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _rows(cls: type, values: Any, prefix: str = "") -> list[tuple[str, ...]]:
    """``(key, value, default, type, allowed, help)`` of every leaf field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        value = values.get(f.name) if isinstance(values, dict) else getattr(values, f.name)
        if dataclasses.is_dataclass(tp):
            rows += _rows(tp, value, f"{key}.")
            continue
        rows.append((key, _fmt(value), _fmt(_default(f)), _type_name(tp), _allowed(f.metadata),
                     str(f.metadata.get("help", ""))))
    return rows


def _config_rows(cfg) -> list[tuple[str, ...]]:
    """Rows of the whole config; ``params`` expands to the method's ``params.*`` keys."""
    from salad_med.config import Config
    from salad_med.methods.registry import get_method

    rows = []
    method = get_method(cfg.train.method)
    for row in _rows(Config, cfg):
        if row[0] != "params":
            rows.append(row)
        elif method.Params is not None:
            rows += _rows(method.Params, cfg.params, "params.")
        else:
            rows.append((*row[:5], f"{row[5]}; method {method.name!r} takes none"))
    return rows


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Plain text, one line per row, columns aligned; the last column is never cut (it may wrap)."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


@config_app.command("show")
def show(
    config: ConfigOption = None,
    overrides: SetOption = None,
    method: Annotated[str | None, typer.Option(
        "--method", help="Show this method's values and params.* keys (same as --set train.method=NAME).",
    )] = None,
    methods: Annotated[bool, typer.Option(
        "--methods", help="List the registered methods (name, title, paper) and exit.")] = False,
) -> None:
    """Print every config key with its resolved value, default, type, allowed values and meaning.

    Values come from --config and --set (defaults otherwise) after the method's own defaults are
    applied; params.* are the selected method's hyper-parameters (train.method or --method).
    """
    with cli_errors():
        from salad_med.config import load_config
        from salad_med.methods.registry import method_table

        if methods:
            typer.echo(_table([(name, title, paper) for name, title, paper in method_table()],
                              ("METHOD", "TITLE", "PAPER")))
            return
        sets = [*(overrides or []), *([f"train.method={method}"] if method else [])]
        cfg = load_config(config, sets or None)
        source = config or "<defaults>"
        extra = f" + {len(sets)} --set" if sets else ""
        typer.echo(f"# config {source}{extra}; method {cfg.train.method}")
        typer.echo(_table(_config_rows(cfg), _COLUMNS))
