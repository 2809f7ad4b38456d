"""``bdaudit triggers``, ``bdaudit methods`` and ``bdaudit schema``: what the tool knows."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from bdaudit.cli.app import app, guarded
from bdaudit.cli.options import Debug


def show_listing(rows: list[dict[str, Any]], as_json: bool, title: str, params_key: str,
                 columns: tuple[str, str, str]) -> None:
    """A registry listing as JSON or a table: name, parameters with defaults, two text columns."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    for column in ("name", *columns):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = ", ".join(f"{p['name']}={p['default']!r}" for p in row[params_key])
        table.add_row(row["name"], params, row[columns[1]], row[columns[2]])
    Console().print(table)


@app.command()
@guarded
def triggers(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             debug: Debug = False) -> None:
    """List the trigger library: families, their parameters and papers."""
    from bdaudit.triggers import describe_triggers

    show_listing(describe_triggers(), as_json, "Trigger library (use as --trigger NAME:key=value,...)", "params",
                 ("parameters (default)", "summary", "paper"))


@app.command()
@guarded
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            debug: Debug = False) -> None:
    """List the defenses `clean --method` and `bench` accept: papers, needs and settings."""
    from bdaudit.defenses.base import describe_defenses

    show_listing(describe_defenses(), as_json, "Defenses (use as --method NAME; settings as --set key=value)",
                 "settings", ("settings (default)", "needs", "paper"))


@app.command()
@guarded
def schema(debug: Debug = False) -> None:
    """Print the JSON Schema every report validates against."""
    from bdaudit.report.document import report_schema

    typer.echo(json.dumps(report_schema(), indent=2))
