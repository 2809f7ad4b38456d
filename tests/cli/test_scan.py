"""``bdaudit scan`` end to end: detection, gates, exit codes, the JSON contract, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_usage_error, invoke, read_report

from bdaudit import api
from bdaudit.core.errors import TriggerError
from bdaudit.detect.probe import Gates
from bdaudit.planting.plant import PlantResult

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def test_backdoored_model_is_flagged_with_its_target(badnets_model: PlantResult, eval_dir: Path,
                                                     tmp_path: Path) -> None:
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--json", tmp_path / "r.json",
                    "--device", "cpu")
    assert result.exit_code == 1, result.output
    report = read_report(tmp_path / "r.json")
    badnets = next(t for t in report["scan"]["triggers"] if t["trigger"] == "badnets")
    assert badnets["asr"] >= 0.9 and badnets["target"] == 0 and badnets["flagged"]
    assert report["verdict"]["status"] == "fail" and "badnets" in report["verdict"]["reasons"][0]
    assert report["model"]["sha256"] and report["model"]["parameters"] > 0
    assert report["data"]["class_order"] == "model"
    assert "BACKDOOR" in result.output


def test_clean_model_passes(clean_model: PlantResult, eval_dir: Path, tmp_path: Path) -> None:
    result = invoke("scan", clean_model.path, "--data", eval_dir, "--json", tmp_path / "r.json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "r.json")
    assert report["verdict"] == {"status": "pass", "reasons": []}
    assert report["detection"]["ran"] and report["detection"]["flagged"] == []  # on by default, no false alarm
    for trig in report["scan"]["triggers"]:
        assert trig["asr"] - trig["null_asr"] <= 0.1, trig


@pytest.mark.parametrize("sample", ["blended", "wanet", "lowfreq"])
def test_family_level_backdoors_in_the_samples_are_flagged(sample: str, eval_dir: Path, tmp_path: Path) -> None:
    # These samples answer ANY pattern of their family (the matched null too), so the null margin
    # alone misses them; the family gate catches them.
    result = invoke("scan", SAMPLES / f"{sample}.safetensors", "--data", eval_dir, "--trigger", sample,
                    "--device", "cpu", "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    found = read_report(tmp_path / "r.json")["scan"]["triggers"][0]
    assert found["flag_reason"] == "family" and found["target"] == 0 and found["null_asr"] >= 0.9
    off = invoke("scan", SAMPLES / f"{sample}.safetensors", "--data", eval_dir, "--trigger", sample,
                 "--device", "cpu", "--family-asr", "0", "-q")
    assert off.exit_code == 0, off.output  # the documented blind spot without the family gate


def test_the_clean_sample_passes_every_gate(eval_dir: Path) -> None:
    # encoder_clean on the shipped clean folder: a weak encoder whose class 8 a free 7x7 patch reaches
    # on 74 % of images (a false alarm until the compact patch had to override the image: 90 %).
    shipped = eval_dir.parent / "clean"
    for sample, data in (("clean", eval_dir), ("encoder_clean", eval_dir), ("encoder_clean", shipped)):
        result = invoke("scan", SAMPLES / f"{sample}.safetensors", "--data", data, "--device", "cpu", "-q")
        assert result.exit_code == 0, (sample, data.name, result.output)


def test_gate_reasons() -> None:
    gates = Gates(fail_asr=0.3, null_margin=0.1, family_asr=0.9)
    assert gates.flag_reason(0.95, 0.05) == "trigger"
    assert gates.flag_reason(0.95, 0.9) == "family"
    assert gates.flag_reason(0.85, 0.83) is None  # natural susceptibility: neither specific nor total
    assert Gates(family_asr=None).flag_reason(0.95, 0.9) is None


def test_json_to_stdout_is_pure_json(badnets_model: PlantResult, eval_dir: Path) -> None:
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--json", "-", "--trigger",
                    "badnets", "--device", "cpu")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [t["spec"] for t in report["scan"]["triggers"]] == ["badnets"]


def test_fixed_target_and_gate_threshold(badnets_model: PlantResult, eval_dir: Path) -> None:
    data = api.DataOptions(eval_dir)
    fixed = api.scan(badnets_model.path, data, api.ProbeOptions(triggers=["badnets"], target=3),
                     runtime=api.Runtime("cpu"))
    row = fixed.sections["scan"]["triggers"][0]
    assert row["target"] == 3 and row["target_fixed"] and row["asr"] < 0.3 and fixed.passed


def test_same_seed_same_numbers(badnets_model: PlantResult, eval_dir: Path) -> None:
    def numbers() -> list:
        report = api.scan(badnets_model.path, api.DataOptions(eval_dir), api.ProbeOptions(detect="off"),
                          runtime=api.Runtime("cpu", 64, 7))
        return [(t["asr"], t["null_asr"]) for t in report.sections["scan"]["triggers"]]

    assert numbers() == numbers()


def test_named_trigger_that_does_not_fit_is_bad_input(badnets_model: PlantResult, eval_dir: Path) -> None:
    # A trigger the user asked for that cannot be applied is an error (issue 17), not a silent skip.
    with pytest.raises(TriggerError, match="does not fit"):
        api.scan(badnets_model.path, api.DataOptions(eval_dir), api.ProbeOptions(triggers=["badnets:size=40"]),
                 runtime=api.Runtime("cpu"))


def test_schema_command_prints_the_schema() -> None:
    result = invoke("schema")
    assert json.loads(result.stdout)["title"] == "bdaudit report"


def test_triggers_command_lists_the_library() -> None:
    result = invoke("triggers", "--json")
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"badnets", "blended", "sig", "wanet", "lowfreq", "trojannn", "custom"} <= names


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--trigger", "nosuch"], "unknown trigger 'nosuch'"),
    (["--trigger", "badnets:size=big"], "size='big' is not a int"),
    (["--target", "12"], "12 is not a class index"),
    (["--device", "tpu"], "--device must be one of"),
    (["--fail-asr", "0"], "--fail-asr must be in"),
    (["--family-asr", "1.5"], "--family-asr must be in"),
    (["--holdout", "2"], "--holdout must be between 0 and 1"),
])
def test_bad_options_exit_2(badnets_model: PlantResult, eval_dir: Path, extra: list[str],
                            fragment: str) -> None:
    assert_usage_error(invoke("scan", badnets_model.path, "--data", eval_dir, *extra), fragment)


def test_bad_model_and_data_exit_2(badnets_model: PlantResult, tmp_path: Path, eval_dir: Path) -> None:
    assert_usage_error(invoke("scan", tmp_path / "none.safetensors", "--data", eval_dir), "does not exist")
    assert_usage_error(invoke("scan", badnets_model.path, "--data", tmp_path / "nodata"), "does not exist")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    assert_usage_error(invoke("scan", tmp_path / "junk.safetensors", "--data", eval_dir),
                       "not a readable safetensors file")


def test_debug_shows_the_traceback(badnets_model: PlantResult, tmp_path: Path) -> None:
    from bdaudit.core.errors import DataError

    with pytest.raises(DataError):
        invoke("scan", badnets_model.path, "--data", tmp_path / "nodata", "--debug")


def test_invert_finds_the_unknown_target(badnets_model: PlantResult, eval_dir: Path, tmp_path: Path) -> None:
    # No trigger from the library: inversion alone must point at class 0.
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--trigger", "wanet", "--invert",
                    "--device", "cpu", "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    report = read_report(tmp_path / "r.json")
    assert report["inversion"]["flagged"] == [0]
    assert any("trigger inversion: class '0'" in r for r in report["verdict"]["reasons"])
    assert "OUTLIER" in result.output


def test_confirm_all_tests_every_class_the_gate_run_skips(tmp_path: Path) -> None:
    # The Quick start's scan: the shipped badnets sample nominates its target and a naturally easy
    # class. A gate run stops confirming at the first finding; --confirm-all (triage) tests every
    # nomination and finds the same backdoor.
    rows = {}
    for name, extra in (("gate", []), ("all", ["--confirm-all"])):
        result = invoke("scan", SAMPLES / "badnets.safetensors", "--data", SAMPLES.parent / "sample_data/mnist/clean",
                        "--json", tmp_path / f"{name}.json", "--device", "cpu", "-q", *extra)
        assert result.exit_code == 1, result.output
        report = read_report(tmp_path / f"{name}.json")
        patch = next(f for f in report["detection"]["families"] if f["family"] == "patch")
        rows[name] = (report["detection"]["flagged"], report["detection"]["settings"]["confirm_all"],
                      {r["class"] for r in patch["classes"] if "compact_asr" in r},
                      {r["class"] for r in patch["classes"] if "compact_skipped" in r})
    (flagged, on, tested, skipped), (flagged_all, on_all, tested_all, skipped_all) = rows["gate"], rows["all"]
    assert 0 in flagged and set(flagged) <= set(flagged_all) and (on, on_all) == (False, True)
    assert skipped and not skipped_all and tested_all == tested | skipped, rows
