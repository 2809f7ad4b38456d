"""``report.render``: what a person reads on the console for a report."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from bdaudit.report.document import Report
from bdaudit.report.render import epoch_summary, render_report

MODEL = {"path": "m.safetensors", "sha256": "0" * 64, "arch": "bd_cnn_small", "num_classes": 2, "in_chans": 1,
         "input_size": [28, 28], "parameters": 1234, "class_names": ["a", "b"], "provenance": {}}
TRIGGER = {"spec": "badnets", "trigger": "badnets", "target": 0, "target_name": "a", "target_fixed": False,
           "asr": 0.97, "asr_ci": [0.9, 1.0], "n_attacked": 60, "null_asr": 0.05, "robust_accuracy": 0.02,
           "flagged": True, "flag_reason": "asr", "error": None}


def rendered(sections: dict[str, dict[str, Any]], reasons: list[str], kind: str = "scan") -> str:
    report = Report(kind=kind, model=MODEL, data={"class_order": "folders"}, environment={}, gates={},
                    sections=sections, reasons=reasons, wall_time_s=2.0)
    buffer = io.StringIO()
    render_report(report, Console(file=buffer, width=200, color_system=None))
    return buffer.getvalue()


def test_a_failing_scan_shows_the_trigger_and_every_reason() -> None:
    text = rendered({"scan": {"clean_accuracy": 0.99, "n_images": 60, "triggers": [TRIGGER]}},
                    ["trigger badnets sends 97%", "class a is an outlier"])
    assert "1,234 parameters" in text and "class order from folders" in text
    assert "badnets" in text and "BACKDOOR" in text
    assert "FAIL: trigger badnets sends 97%; class a is an outlier" in text


def test_a_passing_report_says_pass_and_its_time() -> None:
    clean_row = {**TRIGGER, "asr": 0.01, "flagged": False, "flag_reason": None}
    text = rendered({"scan": {"clean_accuracy": 0.99, "n_images": 60, "triggers": [clean_row]}}, [])
    assert "PASS in 2.0s" in text and "BACKDOOR" not in text


def test_class_names_cannot_inject_markup() -> None:
    row = {**TRIGGER, "target_name": "[bold]x[/bold]"}
    text = rendered({"scan": {"clean_accuracy": 0.5, "n_images": 60, "triggers": [row]}}, [])
    assert "[bold]x[/bold]" in text


def test_unknown_sections_are_skipped_not_fatal() -> None:
    assert "PASS" in rendered({"future_section": {"anything": 1}}, [])


def test_epoch_summary_names_the_worst_trigger() -> None:
    line = epoch_summary({"epoch": 3, "lr": 0.01, "clean_accuracy": 0.95,
                          "asr": {"badnets": 0.4, "blended": 0.9, "broken": None}})
    assert line == "epoch 3 · lr 0.01 · acc 95.0% · worst ASR 90.0% blended"
    assert epoch_summary({"epoch": 1, "lr": 1.0, "clean_accuracy": 0.5, "asr": {}}).endswith("no trigger probed")
