"""``bdaudit report``: render a saved JSON report (scan, clean, sequela or bench) again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bdaudit.cli.app import app, guard_outputs, guarded, write_rendered
from bdaudit.cli.options import Debug, HtmlOut, SarifOut
from bdaudit.core.errors import BdauditError


def load_saved(path: Path) -> dict[str, Any]:
    """A report written by --json (validated against its schema) or a bench.json."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BdauditError(f"cannot read report {path}: {exc}; pass a file written by --json or bench.json") from None
    if isinstance(payload, dict) and "bench_version" in payload and isinstance(payload.get("cells"), list):
        return payload
    if not isinstance(payload, dict) or "schema_version" not in payload:
        raise BdauditError(f"{path} is not a bdaudit report; pass a file written by --json or bench.json")
    import jsonschema

    from bdaudit.report.document import validate_report

    try:
        validate_report(payload)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise BdauditError(f"{path} breaks the report schema at {where}: {exc.message}") from None
    return payload


@app.command()
@guarded
def report(
    saved: Annotated[Path, typer.Argument(help="A JSON report (--json) or a bench.json.", show_default=False,
                                          metavar="REPORT")],
    html: HtmlOut = None,
    sarif: SarifOut = None,
    debug: Debug = False,
) -> None:
    """Render a saved report as HTML (--html) and/or SARIF (--sarif); exit 0, or 2 on bad input."""
    if html is None and sarif is None:
        raise BdauditError("nothing to write: add --html OUT.html and/or --sarif OUT.sarif")
    guard_outputs([("--html", html), ("--sarif", sarif)], [saved])
    payload = load_saved(saved)
    if sarif is not None and "bench_version" in payload:
        raise BdauditError("a bench result has no findings to put in SARIF; use --html")
    write_rendered(payload, sarif, html)
    typer.echo(", ".join(str(p) for p in (html, sarif) if p is not None))
