"""Test helpers: run the CLI in-process and check the one-line error contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from bdaudit.cli import app
from bdaudit.report.document import validate_report

runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_usage_error(result: Result, fragment: str) -> None:
    """Exit 2, a single line that names the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    text = result.stderr.strip()
    assert fragment in text, text
    assert "Traceback" not in result.output + result.stderr
    assert len(text.replace("\n", " ").split("error:")) == 2  # one error, not a cascade


def read_report(path: Path) -> dict[str, Any]:
    report = json.loads(path.read_text())
    validate_report(report)
    return report
