"""Console rendering of reports with rich: people read tables, machines read the JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bdaudit.report.document import Report

MAX_SCHEDULE_ROWS = 64

def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _ci(interval: list[float] | None, n: int | None) -> str:
    return "—" if not interval else f"{interval[0]:.0%}–{interval[1]:.0%} (n={n})"


def scan_table(scan: dict[str, Any], title: str = "Trigger probes") -> Table:
    table = Table(title=f"{title} — clean accuracy {_pct(scan['clean_accuracy'])} "
                        f"on {scan['n_images']} held-out images")
    for column in ("trigger", "target", "ASR", "ASR 95% CI", "null ASR", "robust acc", "verdict"):
        table.add_column(column, justify="left" if column in ("trigger", "target") else "right",
                         overflow="fold" if column == "trigger" else "ellipsis")
    for row in scan["triggers"]:
        if row["error"]:
            table.add_row(escape(row["spec"]), "—", "—", "—", "—", "—", f"[yellow]skipped: {escape(row['error'])}")
            continue
        # Class names come from the model file: escaped, so they cannot inject (or break) markup.
        target = escape(f"{row['target_name']}") + (" (given)" if row["target_fixed"] else "")
        verdict = "[green]ok" if not row["flagged"] else \
            "[bold red]BACKDOOR (family)" if row.get("flag_reason") == "family" else "[bold red]BACKDOOR"
        table.add_row(escape(row["spec"]), target, _pct(row["asr"]), _ci(row.get("asr_ci95"), row.get("n_probe")),
                      _pct(row["null_asr"]),
                      _pct(row["robust_accuracy"]), verdict)
    return table


def clean_tables(clean: dict[str, Any]) -> list[Any]:
    before, after = clean["before"], clean["after"]
    table = Table(title=f"{clean['method']} ({clean['scope']} model) — before vs after cleaning, "
                        f"{clean['seconds']:.0f}s")
    for column in ("", "target", "before", "after"):
        table.add_column(column, justify="left" if column in ("", "target") else "right")
    table.add_row("clean accuracy", "", _pct(before["clean_accuracy"]), _pct(after["clean_accuracy"]))
    if clean.get("accuracy_drop_ci95"):
        low, high = clean["accuracy_drop_ci95"]
        table.add_row("accuracy lost (95 % CI)", "", "",
                      f"{_pct(clean['accuracy_drop'])} ({_pct(low)} to {_pct(high)}, n={after['n_images']})")
    for b, a in zip(before["triggers"], after["triggers"], strict=True):
        if b["error"]:
            continue
        style = "[bold red]" if a["flagged"] else "[green]"
        table.add_row(escape(f"ASR {b['spec']}"), escape(str(b["target_name"])), _pct(b["asr"]), style + _pct(a["asr"]))
    renderables: list[Any] = [table]
    if clean.get("finding"):
        renderables.append(f"Finding before cleaning: {clean['finding']}")
    schedule = clean["hyperparameters"].get("schedule")
    if schedule:
        renderables.append(schedule_line(schedule, clean["hyperparameters"].get("peak_selection", {})))
    unlearning = clean["hyperparameters"].get("unlearning")
    if unlearning:
        renderables.append(f"Unlearned (true labels on {unlearning['fraction']:.0%} of each batch, half of "
                           f"them fresh family members): {', '.join(unlearning['triggers'])}")
    return renderables


def schedule_line(schedule: dict[str, Any], selection: dict[str, Any]) -> str:
    source = selection.get("source", "given")
    return (f"SFT schedule: {schedule['total_steps']} steps, cycles of {schedule['cycle_steps']}; "
            f"phase 1 peak {schedule['lr_peak1']:.3g} ({source}), phase 2 peak "
            f"{schedule['lr_peak2']:.3g}, base {schedule['lr_base']:.3g}, phase 1 = first "
            f"{schedule['phase1_fraction']:.0%}")


def render_schedule(plan: dict[str, Any], console: Console) -> None:
    """Print the planned schedule: a summary line and the rate at each step, bucketed."""
    from dataclasses import asdict

    schedule = plan["schedule"]
    console.print(schedule_line(asdict(schedule), plan["peak_selection"]), soft_wrap=True)
    table = Table(title="learning rate by step")
    table.add_column("step", justify="right")
    table.add_column("phase", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("", justify="left")
    top = max(schedule.lr_peak1, schedule.lr_peak2)
    # Bounded: a huge --epochs must print a readable table at once, not millions of rows.
    stride = max(1, schedule.cycle_steps // 4, -(-schedule.total_steps // MAX_SCHEDULE_ROWS))
    for step in range(0, schedule.total_steps, stride):
        rate = schedule(step)
        table.add_row(str(step), str(schedule.phase(step)), f"{rate:.4g}", "█" * round(30 * rate / top))
    console.print(table)


def sequela_tables(section: dict[str, Any]) -> list[Any]:
    mia = Table(title="Membership inference (members vs held-out; best of 4 score attacks)")
    for column in ("member set", "model", "best attack", "AUC", "TPR @ 1% FPR", "members"):
        left = column in ("member set", "model", "best attack")
        mia.add_column(column, justify="left" if left else "right")
    for set_name, results in section["membership"].items():
        for role, result in results.items():
            if role == "change":
                continue
            best = result["attacks"][result["best_attack"]]
            mia.add_row(set_name.replace("_", " "), role, result["best_attack"],
                        f"{result['best_auc']:.3f}", _pct(best["tpr_at_1pct_fpr"]), str(result["n_members"]))
    renderables: list[Any] = [mia]
    reinjection = section.get("reinjection")
    if reinjection:
        table = Table(title=f"Re-injection: retuning attack with {reinjection['trigger']} → class "
                            f"{reinjection['target']}")
        for column in ("model", "ASR before", "ASR after retuning", "steps to 50% ASR", "clean acc after"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for role, result in reinjection["models"].items():
            steps = result["steps_to_regain"]
            table.add_row(role, _pct(result["initial_asr"]), _pct(result["final_asr"]),
                          "not reached" if steps is None else str(steps),
                          _pct(result["final_clean_accuracy"]))
        renderables.append(table)
    return renderables


def inversion_table(section: dict[str, Any]) -> list[Any]:
    table = Table(title=f"Trigger inversion (Neural Cleanse, {section['settings']['anomaly_scale']} anomaly index) "
                        f"— {section['seconds']:.0f}s")
    for column in ("class", "mask L1", "attack success", "anomaly index", "verdict"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in section["classes"]:
        index = "—" if row["anomaly_index"] is None else f"{row['anomaly_index']:.2f}"
        table.add_row(row["name"], f"{row['mask_l1']:.1f}", _pct(row["attack_success"]), index,
                      "[bold red]OUTLIER" if row["flagged"] else "[green]ok")
    return [table]


def detection_tables(section: dict[str, Any], title: str = "Unknown-trigger detector") -> list[Any]:
    if not section.get("ran", True):
        return [f"{title}: not run ({section.get('skipped_because', 'off')})"]
    scope = ("all classes" if section["all_classes_inverted"] else
             f"{len(section['candidates'])} of {section['num_classes']} classes chosen by a pre-screen")
    table = Table(title=f"{title} (seed {section['seed']}; {scope}; {section['n_images']} clean images) "
                        f"— {section['seconds']:.0f}s")
    families = section["families"]
    by_class = [{row["class"]: row for row in f["classes"]} for f in families]
    for column in ("class", *(f["family"] for f in families), "verdict"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for cls in section["candidates"]:
        rows = [b.get(cls) for b in by_class]
        name = next(r["name"] for r in rows if r)
        cells = []
        for f, r in zip(families, rows, strict=True):
            if r is None:
                cells.append("—")
            elif f["family"] == "square":
                cells.append(f"{r['attack_success']:.0%} moved" if "square" in r else
                             f"{r.get('screen_share', 0):.0%} (screen)")
            elif f["family"] == "transform":
                suspect = " (suspect)" if cls in f.get("suspects", []) else ""
                cells.append(f"{r['attack_success']:.0%} sent{suspect}")
            else:
                index = "—" if r["anomaly_index"] is None else f"{r['anomaly_index']:.1f}"
                compact = (f"; compact {r['compact_asr']:.0%}" if "compact_asr" in r else
                           "; compact test skipped" if "compact_skipped" in r else "")
                cells.append(f"{r['size']:.1f} (index {index}{compact})")
        flagged = any(r and r["flagged"] for r in rows)
        table.add_row(name, *cells, "[bold red]OUTLIER" if flagged else "[green]ok")
    suspects = sorted({c for f in families for c in f.get("suspects", [])})
    lines: list[Any] = [table]
    if suspects:
        action = "" if "before_flagged" in section else \
            ", clean unlearns them"
        lines.append(f"Suspects (brightening sends most images to class(es) {suspects}; not gated{action}): "
                     "a colour-filter trigger or a model that is not robust to brightness")
    return lines


SECTION_RENDERERS: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
    "scan": lambda section: [scan_table(section)],
    "inversion": inversion_table,
    "detection": detection_tables,
    "verification": lambda section: detection_tables(section, "Independent re-detection on the cleaned model"),
    "clean": clean_tables,
    "sequela": sequela_tables,
}


def render_report(report: Report, console: Console) -> None:
    payload = report.to_dict()
    model = payload["model"]
    console.print(f"[bold]{report.kind}[/] {escape(str(model['path']))}  ({escape(str(model['arch']))}, "
                  f"{model['parameters']:,} parameters, {model['num_classes']} classes; "
                  f"class order from {payload['data']['class_order']})")
    for name, section in report.sections.items():
        if name == "scan" and "clean" in report.sections:
            continue  # the clean tables show the same scan beside the "before" one
        for renderable in SECTION_RENDERERS.get(name, lambda _s: [])(section):
            console.print(renderable, soft_wrap=isinstance(renderable, str))
    if report.passed:
        console.print(f"[bold green]PASS[/] in {report.wall_time_s:.1f}s")
    else:
        console.print("[bold red]FAIL[/]: " + escape("; ".join(report.reasons)))


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


def epoch_summary(row: dict[str, Any]) -> str:
    """One short line per epoch: accuracy and the worst probed trigger, not every trigger's ASR."""
    rates = {spec: asr for spec, asr in row["asr"].items() if asr is not None}
    worst = max(rates, key=lambda spec: rates[spec]) if rates else None
    worst_text = f"worst ASR {rates[worst]:.1%} {worst[:20]}" if worst else "no trigger probed"
    return f"epoch {row['epoch']} · lr {row['lr']:.3g} · acc {row['clean_accuracy']:.1%} · {worst_text}"


@contextmanager
def epoch_progress(console: Console, enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """clean's per-epoch feedback: one live line on a terminal, one short line per epoch in a log."""
    if not enabled:
        yield lambda _row: None
        return
    if not console.is_terminal:
        yield lambda row: console.print(epoch_summary(row), markup=False, highlight=False)
        return
    with Progress(BarColumn(bar_width=10), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as bars:
        task = bars.add_task("cleaning: first epoch", total=None)
        yield lambda row: bars.update(task, description=epoch_summary(row), completed=row["epoch"])


def bench_tables(result: dict[str, Any]) -> list[Any]:
    """Per-cell results and the per-method summary of a ``bdaudit bench`` run."""
    # Ten columns: no vertical rules and no edge padding, so the table stays whole at 80 columns.
    cells = Table(title="Defense x model x clean-data size (accuracy and ASR before→after)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for column in ("model", "clean", "method", "CA %", "ASR %", "MIA AUC", "re-inj steps", "s"):
        left = column in ("model", "method")
        # Values never wrap; headers of several words do, which is what keeps 80 columns enough.
        cells.add_column(column, justify="left" if left else "right", no_wrap=column != "re-inj steps"
                         and column != "MIA AUC")
    for row in result["cells"]:
        style = "[bold red]" if row["asr_after"] >= 0.3 else "[green]"
        steps = row.get("reinjection_steps")
        cells.add_row(row["model"], str(row["clean_images"]), row["method"],
                      f"{100 * row['ca_before']:.1f}→{100 * row['ca_after']:.1f}",
                      f"{100 * row['asr_before']:.1f}→" + style + f"{100 * row['asr_after']:.1f}",
                      "—" if row.get("mia_auc") is None else f"{row['mia_auc']:.3f}",
                      "—" if steps is None else str(steps), f"{row['seconds']:.0f}")
    summary = Table(title="Per method (worst case over models; recommended = lowest worst-case ASR within "
                          "a 2-point accuracy cost on every model)", box=box.SIMPLE_HEAD, pad_edge=False,
                    show_edge=False, collapse_padding=True)
    for column in ("clean", "method", "worst ASR", "mean ASR", "mean CA drop", "worst CA drop", "mean s", ""):
        summary.add_column(column, justify="left" if column == "method" else "right",
                           no_wrap=column in ("method", ""), min_width=11 if column == "" else None)
    for row in result["summary"]:
        mark = "[bold green]recommended" if result["recommended"].get(str(row["clean_images"])) == row["method"] \
            else ""
        summary.add_row(str(row["clean_images"]), row["method"], _pct(row["worst_asr"]), _pct(row["mean_asr"]),
                        _pct(row["mean_accuracy_drop"]), _pct(row["worst_accuracy_drop"]),
                        f"{row['mean_seconds']:.0f}", mark)
    return [cells, summary]
