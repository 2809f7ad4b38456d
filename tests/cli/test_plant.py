"""``bdaudit plant`` from the command line: a model comes out self-describing; bad input exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_usage_error, invoke

from bdaudit.models.checkpoint import load_model
from bdaudit.planting.plant import PlantResult


def test_plant_writes_a_self_describing_backdoored_model(train_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = invoke("plant", "--data", train_dir, "--eval-data", eval_dir, "--out", out, "--attack", "badnets",
                    "--target", "3", "--arch", "bd_cnn_tiny", "--epochs", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    prov = loaded.config.provenance
    assert prov["attack"] == "badnets" and prov["target"] == 3 and prov["poison_rate"] == 0.1
    assert prov["paradigm"] == "standalone" and "clean_accuracy" in prov["measured"]
    assert loaded.config.in_chans == 1 and loaded.config.input_size == (28, 28)
    assert loaded.config.class_names == tuple(str(i) for i in range(10))


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--attack", "nosuch"], "unknown attack 'nosuch'"),
    (["--target", "10"], "--target 10 is not a class index"),
    (["--poison-rate", "1.5"], "--poison-rate must be in (0, 1)"),
    (["--poison-rate", "0.95"], "non-target images are available"),
    (["--paradigm", "sideways"], "--paradigm must be one of"),
    (["--paradigm", "transfer"], "needs --downstream-data"),
    (["--trigger-params", "size"], "is not key=value"),
])
def test_bad_plant_input_exits_2(train_dir: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    result = invoke("plant", "--data", train_dir, "--out", tmp_path / "m.safetensors", "--arch", "bd_cnn_tiny",
                    "--epochs", "1", "--device", "cpu", *extra)
    assert_usage_error(result, fragment)


def test_existing_output_is_refused(train_dir: Path, badnets_model: PlantResult) -> None:
    before = badnets_model.path.read_bytes()
    assert_usage_error(invoke("plant", "--data", train_dir, "--out", badnets_model.path), "already exists")
    assert badnets_model.path.read_bytes() == before
