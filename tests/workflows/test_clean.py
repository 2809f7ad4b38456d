"""``bdaudit clean``: a planted model is cleaned, gates and exit codes hold, nothing is lost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_usage_error, invoke, read_report

from bdaudit.detect.probe import ScanResult
from bdaudit.models.checkpoint import load_model
from bdaudit.planting.plant import PlantResult
from bdaudit.workflows.clean import CleanGates, CleanOutcome, accuracy_drop_interval, clean_reasons

# Trigger unlearning off: these tests are about the tuning methods themselves (test_unlearning.py).
FAST = ("--epochs", "10", "--set", "min_steps=0", "--device", "cpu", "--trigger", "badnets", "--no-sequela",
        "--unlearn-fraction", "0")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_run(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path, str]:
    """SFT once on the tiny BadNets model (module-scoped: several tests read its outputs)."""
    out_dir = tmp_path_factory.mktemp("clean")
    before = sha(badnets_model.path)
    result = invoke("clean", badnets_model.path, "--data", clean_dir, "--eval-data", eval_dir, "--method", "sft",
                    "--out", out_dir / "cleaned.safetensors", "--json", out_dir / "report.json",
                    "--max-accuracy-drop", "0.05", *FAST)
    return result, out_dir / "cleaned.safetensors", out_dir / "report.json", before


def test_sft_removes_the_backdoor_and_keeps_accuracy(sft_run: tuple) -> None:
    result, _, report_path, _ = sft_run
    report = read_report(report_path)
    clean = report["clean"]
    assert clean["before"]["triggers"][0]["asr"] >= 0.9
    assert clean["after"]["triggers"][0]["asr"] < 0.3  # below the default gate
    assert clean["accuracy_drop"] <= 0.05
    low, high = clean["accuracy_drop_ci95"]  # each held-out image paired before and after
    assert low <= clean["accuracy_drop"] <= high and high - low < 0.2
    assert result.exit_code == 0, result.output
    assert report["verdict"]["status"] == "pass"
    # The default (sparse) history: every 5 epochs and the last, on 200 fixed held-out images.
    assert [row["epoch"] for row in clean["history"]] == [5, 10]
    assert {"lr", "loss", "clean_accuracy", "asr"} <= set(clean["history"][0])
    assert clean["history"][0]["n_images"] == 200 and list(clean["history"][0]["asr"]) == ["badnets"]
    schedule = clean["hyperparameters"]["schedule"]
    assert schedule["lr_peak1"] > schedule["lr_peak2"] > schedule["lr_base"] > 0
    assert clean["hyperparameters"]["peak_selection"]["source"] in ("lr range test", "given") or \
        clean["hyperparameters"]["peak_selection"]["source"].startswith("fallback")


def test_cleaned_checkpoint_keeps_metadata_and_adds_provenance(sft_run: tuple,
                                                                 badnets_model: PlantResult) -> None:
    _, cleaned, _, before_sha = sft_run
    assert sha(badnets_model.path) == before_sha  # the input was never touched
    loaded = load_model(cleaned)
    assert loaded.config.class_names == badnets_model.config.class_names
    assert loaded.config.provenance["attack"] == "badnets"  # original provenance kept
    cleaned_prov = loaded.config.provenance["cleaned"]
    assert cleaned_prov["method"] == "sft" and cleaned_prov["source_sha256"] == before_sha
    assert cleaned_prov["after"]["asr"]["badnets"] < 0.3


def test_plain_ft_is_the_weaker_baseline(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path,
                                        tmp_path: Path) -> None:
    result = invoke("clean", badnets_model.path, "--data", clean_dir, "--eval-data", eval_dir,
                    "--method", "ft", "--json", tmp_path / "r.json", *FAST)
    report = read_report(tmp_path / "r.json")
    after = report["clean"]["after"]["triggers"][0]["asr"]
    assert report["clean"]["method"] == "ft"
    assert (result.exit_code == 1) == (after >= 0.3)  # the gate agrees with the number


def test_existing_output_is_refused_without_force(sft_run: tuple, badnets_model: PlantResult,
                                                  clean_dir: Path) -> None:
    _, cleaned, _, _ = sft_run
    before = sha(cleaned)
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, "--out", cleaned, *FAST),
                       "already exists")
    assert sha(cleaned) == before


def test_output_equal_to_input_is_refused(badnets_model: PlantResult, clean_dir: Path) -> None:
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, "--out", badnets_model.path,
                              "--force", *FAST), "never overwrites")


def test_show_schedule_prints_without_training(badnets_model: PlantResult, clean_dir: Path) -> None:
    result = invoke("clean", badnets_model.path, "--data", clean_dir, "--show-schedule", "--method", "sft",
                    "--lr-peak1", "0.2", "--epochs", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "phase 1 peak 0.2 (given)" in text and "phase 2 peak 0.002" in text


def test_config_file_fills_flags_and_explicit_flags_win(badnets_model: PlantResult, clean_dir: Path,
                                                        tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lr-peak1": 0.3, "epochs": 6, "phase1_fraction": 0.5}))
    result = invoke("clean", badnets_model.path, "--data", clean_dir, "--show-schedule", "--method", "sft",
                    "--config", config, "--epochs", "4", "--set", "min_steps=0", "--device", "cpu")
    text = " ".join(result.output.split())
    assert "phase 1 peak 0.3 (given)" in text and "phase 1 = first 50%" in text
    assert "SFT schedule: 20 steps" in text  # --epochs 4 beat the file's 6 (320 images, batch 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"no-such-flag": 1}))
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, "--config", bad),
                       "'no-such-flag' is not a flag")


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--method", "magic"], "unknown method 'magic'"),
    (["--scope", "middle"], "must be one of full, head"),
    (["--method", "sft", "--lr-peak1", "50"], "--lr-peak1 must be in (0, 10]"),
    (["--method", "sft", "--phase1-fraction", "1.5"], "--phase1-fraction must be in (0, 1)"),
    (["--lr-peak1", "0.1"], "method ftsam has no setting(s) lr_peak1"),  # the default is FT-SAM
    (["--epochs", "0"], "--epochs must be between 1 and"),
    (["--method", "ft", "--lr-peak1", "0.1"], "method ft has no setting(s) lr_peak1"),
    (["--out", "x.pt"], "must end in .safetensors"),
])
def test_bad_hyper_parameters_exit_2(badnets_model: PlantResult, clean_dir: Path, extra: list[str],
                                     fragment: str) -> None:
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, *extra), fragment)


def test_too_few_clean_images_and_missing_classes(badnets_model: PlantResult, clean_dir: Path,
                                                  tmp_path: Path) -> None:
    import shutil

    few = tmp_path / "few"
    for cls in sorted(clean_dir.iterdir()):
        (few / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:4]:
            shutil.copy(image, few / cls.name)
    assert_usage_error(invoke("clean", badnets_model.path, "--data", few, "--eval-data", clean_dir, *FAST),
                       "need at least 5 per class")
    shutil.rmtree(few / "7")
    assert_usage_error(invoke("clean", badnets_model.path, "--data", few, "--eval-data", clean_dir, *FAST),
                       "no tuning images of class(es) 7")


def test_head_scope_needs_a_recorded_head(badnets_model: PlantResult, clean_dir: Path,
                                          tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"head": "no_such_module"}))
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, "--scope", "head",
                              "--model-config", tmp_path / "m.yaml", *FAST), "no module 'no_such_module'")


def test_sequela_of_the_cleaned_model(sft_run: tuple, badnets_model: PlantResult, clean_dir: Path,
                                      eval_dir: Path, tmp_path: Path) -> None:
    _, cleaned, _, _ = sft_run
    result = invoke("sequela", cleaned, "--data", clean_dir, "--eval-data", eval_dir, "--original",
                    badnets_model.path, "--trigger", "badnets", "--device", "cpu",
                    "--max-reinjection-asr", "0.99", "--json", tmp_path / "s.json")
    report = read_report(tmp_path / "s.json")
    section = report["sequela"]
    tuning = section["membership"]["tuning_subset"]
    assert {"model", "original", "change"} <= set(tuning)
    assert 0.0 <= tuning["model"]["best_auc"] <= 1.0
    runs = section["reinjection"]["models"]
    assert section["reinjection"]["target"] == 0
    assert runs["original"]["initial_asr"] >= 0.9 and runs["original"]["steps_to_regain"] == 0
    assert runs["model"]["initial_asr"] < 0.3  # the cleaned model starts clean ...
    assert runs["model"]["final_asr"] >= runs["model"]["initial_asr"]  # ... and retuning only adds
    assert (result.exit_code == 1) == (runs["model"]["final_asr"] > 0.99)


def test_methods_lists_every_defense_with_its_settings() -> None:
    result = invoke("methods", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert {"sft", "ft", "fp", "nad", "anp", "ibau", "ftsam", "fst", "nc"} <= set(rows)
    assert any(s["name"] == "prune_ratio_max" for s in rows["fp"]["settings"]) and rows["nc"]["paper"]


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--method", "fp", "--set", "prune_ratio_max=2"], "`prune_ratio_max` must be in"),  # a --set key: its own name
    (["--method", "fp", "--set", "no_such=1"], "method fp has no setting(s) no_such"),
    (["--method", "fp", "--set", "oops"], "--set takes KEY=VALUE"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
])
def test_method_settings_are_checked(badnets_model: PlantResult, clean_dir: Path, extra: list[str],
                                     fragment: str) -> None:
    assert_usage_error(invoke("clean", badnets_model.path, "--data", clean_dir, *extra, *FAST), fragment)


def test_default_method_is_the_bench_winner(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path,
                                            tmp_path: Path) -> None:
    # FT-SAM with trigger unlearning, chosen on `make bench` (benchmarks/README.md).
    result = invoke("clean", badnets_model.path, "--data", clean_dir, "--eval-data", eval_dir, "--json",
                    tmp_path / "r.json", "--epochs", "6", "--set", "min_steps=0", "--device", "cpu", "--trigger",
                    "badnets", "--no-sequela", "--max-accuracy-drop", "0.06")
    report = read_report(tmp_path / "r.json")
    assert report["clean"]["method"] == "ftsam"
    assert report["clean"]["hyperparameters"]["unlearning"] == {"triggers": ["badnets"], "fraction": 0.3,
                                                                 "family_share": 0.5}
    assert report["clean"]["after"]["triggers"][0]["asr"] < 0.3 and result.exit_code == 0, result.output


def test_full_history_probes_every_epoch_and_trains_the_same_weights(badnets_model: PlantResult, clean_dir: Path,
                                                                     eval_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from bdaudit import api

    runs = {}
    for history in ("sparse", "full"):
        out = tmp_path / f"{history}.safetensors"
        report = api.clean(badnets_model.path, api.DataOptions(clean_dir, eval_dir),
                           api.CleanOptions(settings={"epochs": 6, "min_steps": 0}, history=history),
                           api.ProbeOptions(triggers=("badnets", "blended"), detect="off"),
                           output=api.OutputOptions(out), runtime=api.Runtime("cpu", 256, 0))
        runs[history] = (report.sections["clean"], load_file(out))
    sparse, full = runs["sparse"][0], runs["full"][0]
    assert [r["epoch"] for r in full["history"]] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in sparse["history"]] == [5, 6]
    assert full["history"][0]["n_images"] == 600 and sparse["history"][0]["n_images"] == 200
    assert set(full["history"][0]["asr"]) == {"badnets", "blended"}  # every trigger
    assert set(sparse["history"][0]["asr"]) == {t["spec"] for t in sparse["before"]["triggers"] if t["flagged"]}
    assert sparse["hyperparameters"]["history"]["mode"] == "sparse"
    weights_sparse, weights_full = runs["sparse"][1], runs["full"][1]
    assert weights_sparse.keys() == weights_full.keys()
    assert all(torch.equal(weights_sparse[k], weights_full[k]) for k in weights_sparse)
    # The last rows describe the same final model, probed on different images.
    assert full["history"][-1]["loss"] == sparse["history"][-1]["loss"]


def test_clean_options_are_checked() -> None:
    from bdaudit.core.errors import BdauditError
    from bdaudit.workflows.clean import DefenseRun

    with pytest.raises(BdauditError, match="`history`"):
        DefenseRun(history="some")
    with pytest.raises(BdauditError, match="`history_every`"):
        DefenseRun(history_every=0)


def _outcome(n: int, lost: int) -> CleanOutcome:
    before = torch.ones(n, dtype=torch.bool)
    after = before.clone()
    after[:lost] = False
    scans = [ScanResult(float(c.float().mean()), n, [], clean_correct=c) for c in (before, after)]
    return CleanOutcome(scans[0], scans[1], [], {}, 0.0, torch.nn.Identity())


def test_the_accuracy_gate_gives_its_interval_and_says_when_it_is_within_noise() -> None:
    gates = CleanGates(max_accuracy_drop=0.02)
    few = clean_reasons(_outcome(80, 2), gates)  # 2 of 80 images: 2.5 points, not surely over 2
    assert len(few) == 1 and "95 % CI" in few[0] and "on 80 images" in few[0] and "within noise" in few[0]
    many = clean_reasons(_outcome(600, 60), gates)  # 10 points on 600 images: surely over the gate
    assert len(many) == 1 and "95 % CI" in many[0] and "within noise" not in many[0]
    assert clean_reasons(_outcome(600, 6), gates) == []  # 1 point: under the gate
    low, high = accuracy_drop_interval(_outcome(600, 60))
    assert low < 0.1 < high
