"""``report.document``: the Report container, its JSON contract and how findings become sections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bdaudit.report.document import SCHEMA_VERSION, Report

MODEL = {"path": "m.safetensors", "sha256": "0" * 64, "arch": "bd_cnn_small", "num_classes": 2, "in_chans": 1,
         "input_size": [28, 28], "parameters": 10, "class_names": ["a", "b"], "provenance": {}}


class Part:
    def __init__(self, sections: dict[str, dict[str, Any]], reasons: list[str]) -> None:
        self._sections, self._reasons = sections, reasons

    def sections(self) -> dict[str, dict[str, Any]]:
        return self._sections

    def reasons(self) -> list[str]:
        return self._reasons


def report(*parts: Part) -> Report:
    return Report.of("scan", list(parts), model=MODEL, data={"class_order": "folders"},
                     environment={"device": "cpu", "seed": 0}, gates={"fail_asr": 0.3}, wall_time_s=1.23456)


def test_findings_become_sections_and_reasons_in_order() -> None:
    built = report(Part({"scan": {"n": 1}, "detection": {"ran": False}}, ["first"]),
                   Part({"sequela": {"x": 2}}, ["second", "third"]))
    assert list(built.sections) == ["scan", "detection", "sequela"]
    assert built.reasons == ["first", "second", "third"] and not built.passed


def test_no_reasons_is_a_pass() -> None:
    assert report(Part({"scan": {}}, [])).passed


def test_json_layout_is_the_contract() -> None:
    payload = report(Part({"scan": {"n": 1}}, ["why"])).to_dict()
    assert list(payload) == ["schema_version", "kind", "tool", "created", "wall_time_s", "model", "data",
                             "environment", "gates", "scan", "verdict"]
    assert payload["schema_version"] == SCHEMA_VERSION and payload["wall_time_s"] == 1.235
    assert payload["verdict"] == {"status": "fail", "reasons": ["why"]}


def test_write_json_to_a_file_and_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = report(Part({"scan": {"n": 1}}, []))
    built.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == built.to_dict()
    built.write_json("-")
    assert json.loads(capsys.readouterr().out)["verdict"]["status"] == "pass"


def test_artifacts_stay_out_of_the_json() -> None:
    built = report(Part({"scan": {}}, []))
    built.artifacts["inversion"] = object()
    assert "inversion" not in built.to_dict() and json.dumps(built.to_dict())


def test_the_report_layer_does_not_import_the_detectors() -> None:
    code = "import sys, bdaudit.report.document; print(any(m.startswith('bdaudit.detect') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
