"""``bdaudit.api``, the façade a Python user calls: typed options, field-named errors, refusals
before any work, and the report it returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdaudit import api
from bdaudit.core.errors import BdauditError
from bdaudit.planting.plant import PlantResult


def test_a_python_user_is_told_the_field_not_a_flag() -> None:
    with pytest.raises(BdauditError) as info:
        api.Runtime(batch_size=0)
    assert "`batch_size`" in str(info.value) and "--batch-size" not in str(info.value)


def test_clean_refuses_an_existing_output_before_loading_anything(tmp_path: Path) -> None:
    existing = tmp_path / "cleaned.safetensors"
    existing.write_text("keep me")
    # The model does not exist: the refusal must come first, before any loading or training.
    with pytest.raises(BdauditError, match="already exists.*`force`"):
        api.clean(tmp_path / "missing.safetensors", api.DataOptions(tmp_path), output=api.OutputOptions(existing))
    assert existing.read_text() == "keep me"


def test_clean_output_must_be_safetensors(tmp_path: Path) -> None:
    with pytest.raises(BdauditError, match="must end in .safetensors"):
        api.clean(tmp_path / "m.safetensors", api.DataOptions(tmp_path),
                  output=api.OutputOptions(tmp_path / "cleaned.pt"))


def test_plant_refusals_name_fields(tmp_path: Path) -> None:
    with pytest.raises(BdauditError, match="`paradigm` must be one of standalone, transfer, encoder"):
        api.PlantOptions(paradigm="federated")
    with pytest.raises(BdauditError, match="`downstream_data`"):
        api.plant(api.DataOptions(tmp_path), api.OutputOptions(tmp_path / "m.safetensors"),
                  api.PlantOptions(paradigm="transfer"))
    with pytest.raises(BdauditError, match="`out` is required"):
        api.plant(api.DataOptions(tmp_path), api.OutputOptions())


def test_plant_never_overwrites_without_force(tmp_path: Path, badnets_model: PlantResult) -> None:
    before = badnets_model.path.read_bytes()
    with pytest.raises(BdauditError, match="already exists"):
        api.plant(api.DataOptions(tmp_path), api.OutputOptions(badnets_model.path))
    assert badnets_model.path.read_bytes() == before


def test_parse_params_needs_key_value() -> None:
    assert api.parse_params(" size=4 , value=1 ,") == {"size": "4", "value": "1"}
    with pytest.raises(BdauditError, match="`trigger_params` item 'size' is not key=value"):
        api.parse_params("size")


def test_bench_needs_held_out_images(tmp_path: Path) -> None:
    plan = api.BenchPlan(methods=("ft",), clean_sizes=(10,))
    with pytest.raises(BdauditError, match="`eval_data` is required"):
        api.bench([], api.DataOptions(tmp_path), plan, tmp_path / "out")


def test_scan_with_named_triggers_skips_the_detector_and_says_why(badnets_model: PlantResult,
                                                                 eval_dir: Path) -> None:
    report = api.scan(badnets_model.path, api.DataOptions(eval_dir), api.ProbeOptions(triggers=["badnets"]),
                      runtime=api.Runtime("cpu"))
    assert report.kind == "scan" and list(report.sections) == ["scan", "detection"]
    assert [t["trigger"] for t in report.sections["scan"]["triggers"]] == ["badnets"]
    detection = report.sections["detection"]
    assert not detection["ran"] and "--detect on" in detection["skipped_because"]
    # The planted backdoor is found, and the verdict says so in the report's reasons.
    assert not report.passed and any("badnets" in reason for reason in report.reasons)


def test_model_options_carry_flags_to_every_load(badnets_model: PlantResult, eval_dir: Path) -> None:
    # A flag overrides what the checkpoint says: here a class count that disagrees with its names.
    wrong = api.ModelOptions(badnets_model.path, {"num_classes": 3})
    with pytest.raises(BdauditError, match="num_classes is 3"):
        api.scan(wrong, api.DataOptions(eval_dir), api.ProbeOptions(triggers=["badnets"], detect="off"),
                 runtime=api.Runtime("cpu"))


def test_plant_transfer_fine_tunes_the_given_upstream(badnets_model: PlantResult, clean_dir: Path,
                                                      eval_dir: Path, tmp_path: Path) -> None:
    epochs: list[tuple[str, int, int | None]] = []
    result = api.plant(api.DataOptions(clean_dir, eval_dir), api.OutputOptions(tmp_path / "victim.safetensors"),
                       api.PlantOptions(paradigm="transfer", epochs=1),
                       transfer=api.TransferOptions(upstream=badnets_model.path, downstream_data=clean_dir,
                                                    mode="head"),
                       runtime=api.Runtime("cpu", 64, 0),
                       on_epoch=lambda phase, epoch, total, loss: epochs.append((phase, epoch, total)))
    assert result.path.exists() and epochs == [("", 0, 1)]
    provenance = api.ModelOptions(result.path).load().config.provenance
    assert provenance["paradigm"] == "transfer" and provenance["mode"] == "head"
