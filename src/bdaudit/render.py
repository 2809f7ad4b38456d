"""Console rendering of reports with rich: people read tables, machines read the JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bdaudit.report import Report


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def scan_table(scan: dict[str, Any], title: str = "Trigger probes") -> Table:
    table = Table(title=f"{title} — clean accuracy {_pct(scan['clean_accuracy'])} "
                        f"on {scan['n_images']} held-out images")
    for column in ("trigger", "target", "ASR", "null ASR", "robust acc", "verdict"):
        table.add_column(column, justify="left" if column in ("trigger", "target") else "right")
    for row in scan["triggers"]:
        if row["error"]:
            table.add_row(row["spec"], "—", "—", "—", "—", f"[yellow]skipped: {row['error']}")
            continue
        target = f"{row['target_name']}" + (" (given)" if row["target_fixed"] else "")
        verdict = "[bold red]BACKDOOR" if row["flagged"] else "[green]ok"
        table.add_row(row["spec"], target, _pct(row["asr"]), _pct(row["null_asr"]),
                      _pct(row["robust_accuracy"]), verdict)
    return table


SECTION_RENDERERS: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
    "scan": lambda section: [scan_table(section)],
}


def render_report(report: Report, console: Console) -> None:
    payload = report.to_dict()
    model = payload["model"]
    console.print(f"[bold]{report.kind}[/] {model['path']}  ({model['arch']}, "
                  f"{model['parameters']:,} parameters, {model['num_classes']} classes; "
                  f"class order from {payload['data']['class_order']})")
    for name, section in report.sections.items():
        for renderable in SECTION_RENDERERS.get(name, lambda _s: [])(section):
            console.print(renderable)
    if report.passed:
        console.print(f"[bold green]PASS[/] in {report.wall_time_s:.1f}s")
    else:
        console.print("[bold red]FAIL[/]: " + "; ".join(report.reasons))


@contextmanager
def progress_bars(console: Console, enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yields ``start(label, total) -> advance(n)``; a no-op when disabled (quiet/non-TTY)."""
    if not enabled:
        yield lambda _label, _total: (lambda _n: None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bars:
        def start(label: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(label, total=total)
            return lambda n: bars.advance(task, n)

        yield start
