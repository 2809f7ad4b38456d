"""CLI side of many-model runs and executors: the shared options and the summary output, kept out
of the command modules so each command only adds its options and one call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdaudit.cli.app import with_flags
from bdaudit.core.errors import BdauditError
from bdaudit.core.outputs import keep_outputs
from bdaudit.workflows.executors import EXECUTOR_NAMES, create_executor

if TYPE_CHECKING:
    from bdaudit.workflows.batch import BatchReport, ModelOutcome

RUNTIME = "Runtime"
ModelPaths = Annotated[list[Path], typer.Argument(
    help="Checkpoint(s): .safetensors or PyTorch state dicts, a folder of them, or a manifest .yaml "
         "(as sample_models/manifest.yaml). Several models: one report each plus a summary.",
    show_default=False)]
ExecutorName = Annotated[str, typer.Option(
    "--executor", help=f"Where models (or bench cells) run: {' or '.join(EXECUTOR_NAMES)} (one Ray task each; "
                       "needs pip install 'bdaudit\\[ray]').", rich_help_panel=RUNTIME)]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join (HOST:PORT or auto); default: start a local Ray instance.",
    rich_help_panel=RUNTIME)]
ReportDir = Annotated[Path | None, typer.Option(
    "--report-dir", help="Write <name>.json per model and summary.json here (with several models, --json "
                         "writes the summary).", rich_help_panel="Output")]


def wants_batch(models: list[Path], executor: str, report_dir: Path | None) -> bool:
    """The batch output for several models, a folder, a manifest, --report-dir or a non-local executor."""
    from bdaudit.workflows.batch import is_batch

    return is_batch(models) or report_dir is not None or executor != "local"


def one_report_only(batch: bool, sarif: Path | None, html: Path | None) -> None:
    """SARIF and HTML render one model's report: refused for several models, before any work."""
    if batch and (sarif is not None or html is not None):
        raise BdauditError("--sarif/--html render one model's report: with several models use --report-dir "
                           "and `bdaudit report DIR/NAME.json --html OUT.html`")


def run_batch(run: Callable[..., BatchReport], models: list[Path], *args: Any, executor: str,
              ray_address: str | None, report_dir: Path | None, json_out: str | None, console: Console,
              show: bool, **options: Any) -> None:
    """Run ``api.scan_many``/``clean_many``, print a line per model as it finishes and the summary
    table, write --json (the summary), and exit with the worst model's code."""
    if json_out is not None and json_out != "-" and Path(json_out).is_dir():
        raise BdauditError(f"--json {json_out} is a folder; with several models --json takes the summary "
                           "file, --report-dir the per-model reports")

    def line(done: int, total: int, outcome: ModelOutcome) -> None:
        if outcome.report is None:
            Console(stderr=True, highlight=False).print(
                f"[bold red]error:[/] model {escape(outcome.entry.name)}: {escape(with_flags(outcome.error or ''))}",
                soft_wrap=True)
        elif show:
            console.print(f"[{done}/{total}] {outcome.entry.name}: {outcome.status.upper()}", markup=False)

    with create_executor(executor, ray_address) as engine:
        batch = run(models, *args, executor=engine, report_dir=report_dir, on_model=line, **options)
    if json_out:
        batch.write_json(json_out)
    if show:
        console.print(summary_table(batch))
    elif batch.exit_code == 1:
        for outcome in batch.outcomes:
            if outcome.status == "fail":
                console.print(f"FAIL {outcome.entry.name}: " + "; ".join(outcome.report.reasons), markup=False)
    # Every model ran and the summary says which did not: those results stand, whatever the exit code.
    keep_outputs()
    if batch.exit_code:
        raise typer.Exit(batch.exit_code)


def summary_table(batch: BatchReport) -> Table:
    counts = batch.counts()
    table = Table(title=f"{batch.kind}: {len(batch.outcomes)} models, {counts['pass']} pass, {counts['fail']} fail, "
                        f"{counts['error']} error ({batch.executor.get('name', 'local')}, {batch.wall_time_s:.0f}s)")
    for column in ("model", "verdict", "exit", "clean acc", "why"):
        table.add_column(column, overflow="fold")
    for outcome in batch.outcomes:
        report = outcome.report
        acc = report.sections.get("scan", {}).get("clean_accuracy") if report else None
        why = outcome.error if report is None else "; ".join(report.reasons)
        style = {"pass": "green", "fail": "red", "error": "bold red"}[outcome.status]
        table.add_row(escape(outcome.entry.name), f"[{style}]{outcome.status.upper()}[/]", str(outcome.exit_code),
                      "" if acc is None else f"{acc:.1%}", escape(why or ""))
    return table
