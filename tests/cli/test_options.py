"""The CLI maps library fields to flags: a Python user reads ``batch_size``, a CLI user
``--batch-size``; shared option groups reach the library intact."""

from __future__ import annotations

from pathlib import Path

from helpers import assert_usage_error, invoke

from bdaudit.cli.app import field_flags, with_flags
from bdaudit.planting.plant import PlantResult


def test_fields_become_the_flags_that_set_them() -> None:
    assert with_flags("`phase1_fraction` must be in (0, 1], not 2") == "--phase1-fraction must be in (0, 1], not 2"
    assert with_flags("pass `arch`/`num_classes` or `model_config` FILE") == \
        "pass --arch/--num-classes or --model-config FILE"
    assert with_flags("add images or use `eval_path` DIR") == "add images or use --eval-data DIR"
    assert with_flags("`triggers` and `triggers_file`") == "--trigger and --triggers"


def test_method_settings_and_plain_text_stay_as_written() -> None:
    # prune_ratio_max is a --set KEY=VALUE setting, not a flag; commands in backticks are prose.
    message = "`prune_ratio_max` must be in (0, 1); see `bdaudit methods`"
    assert with_flags(message) == message


def test_every_flag_is_derived_from_the_commands() -> None:
    flags = field_flags()
    assert flags["unlearn_fraction"] == "--unlearn-fraction" and flags["json_out"] == "--json"
    assert flags["downstream_data"] == "--downstream-data" and flags["clean_fraction"] == "--clean-fraction"


def test_cli_user_sees_the_flag(badnets_model: PlantResult, eval_dir: Path) -> None:
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--batch-size", "0", "--device", "cpu")
    assert_usage_error(result, "--batch-size must be at least 1")
    assert "`" not in result.stderr


def test_library_error_from_a_lower_layer_shows_the_flag(badnets_model: PlantResult, eval_dir: Path) -> None:
    # core.data raises about the `holdout` field; the user typed --holdout.
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--holdout", "1.5", "--device", "cpu")
    assert_usage_error(result, "--holdout must be between 0 and 1")


def test_plant_paradigm_is_checked_by_the_library_and_named_as_a_flag(train_dir: Path, tmp_path: Path) -> None:
    result = invoke("plant", "--data", train_dir, "--out", tmp_path / "m.safetensors", "--paradigm", "federated")
    assert_usage_error(result, "--paradigm must be one of standalone, transfer, encoder")
    assert not (tmp_path / "m.safetensors").exists()


def test_model_flag_group_reaches_the_loader(badnets_model: PlantResult, eval_dir: Path) -> None:
    # --num-classes is declared once (cli/options.ModelFlags) and must still override the checkpoint.
    result = invoke("scan", badnets_model.path, "--data", eval_dir, "--num-classes", "3", "--device", "cpu",
                    "--trigger", "badnets", "--detect", "off")
    assert_usage_error(result, "num_classes is 3")
