"""``bdaudit bench``: a reduced grid on the tiny planted model; outputs, resume, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import assert_usage_error, invoke

from bdaudit.core.data import ImageSet
from bdaudit.planting.plant import PlantResult
from bdaudit.workflows.bench import recommend, stratified_subset, summarize


@pytest.fixture(scope="module")
def manifest(badnets_model: PlantResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "tiny_badnets": {"file": str(badnets_model.path), "attack": "badnets", "trigger": "badnets",
                         "target": 0},
        "ignored_clean": {"file": "nowhere.safetensors", "attack": "none"}}}))
    return path


@pytest.fixture(scope="module")
def bench_run(manifest: Path, clean_dir: Path, eval_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("bench")
    args = ("bench", "--models", manifest, "--clean-data", clean_dir, "--eval-data", eval_dir, "--methods", "ft,sft",
            "--clean-size", "100", "--set", "ft.epochs=3", "--set", "sft.epochs=6", "--reinjection-steps", "10",
            "--out-dir", out, "--device", "cpu")
    return invoke(*args), out


def test_bench_writes_table_json_csv_and_plot(bench_run: tuple) -> None:
    result, out = bench_run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    cells = {c["method"]: c for c in report["cells"]}
    assert set(cells) == {"ft", "sft"} and report["computed"] == 2
    assert all(c["asr_before"] > 0.9 and c["clean_images"] == 100 for c in cells.values())
    # The paper's contrast on this model: SFT removes what plain FT of the same length leaves.
    assert cells["sft"]["asr_after"] < 0.3 < cells["ft"]["asr_after"]
    assert all(c["mia_auc"] is not None and c["reinjection_asr"] is not None for c in cells.values())
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [r["method"] for r in rows] == ["ft", "sft"]
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny_badnets" in result.output and "recommended" in result.output


def test_bench_resumes_without_recomputing(bench_run: tuple, manifest: Path, clean_dir: Path,
                                           eval_dir: Path) -> None:
    _, out = bench_run
    before = json.loads((out / "bench.json").read_text())["cells"]
    again = invoke("bench", "--models", manifest, "--clean-data", clean_dir, "--eval-data", eval_dir,
                   "--methods", "ft,sft", "--clean-size", "100", "--set", "ft.epochs=3", "--set", "sft.epochs=6",
                   "--reinjection-steps", "10", "--out-dir", out, "--device", "cpu", "--quiet")
    assert again.exit_code == 0, again.output
    report = json.loads((out / "bench.json").read_text())
    assert report["computed"] == 0 and report["reused"] == 2
    assert [c["asr_after"] for c in report["cells"]] == [c["asr_after"] for c in before]


def test_a_half_written_cache_line_is_recomputed_not_fatal(bench_run: tuple, tmp_path: Path) -> None:
    from bdaudit.workflows.bench import read_cache

    _, out = bench_run
    text = (out / "cells.jsonl").read_text()
    cut = tmp_path / "cells.jsonl"
    cut.write_text(text + '{"key": "abc", "model": "trunc')
    assert len(read_cache(cut)) == 2


def test_recommendation_rule_prefers_low_worst_case_asr_within_the_accuracy_gate() -> None:
    rows = [
        {"clean_images": 50, "method": "a", "asr_after": 0.01, "accuracy_drop": 0.05, "seconds": 1.0},
        {"clean_images": 50, "method": "b", "asr_after": 0.10, "accuracy_drop": 0.015, "seconds": 1.0},
        {"clean_images": 50, "method": "c", "asr_after": 0.40, "accuracy_drop": 0.0, "seconds": 1.0},
    ]
    assert recommend(summarize(rows)) == {50: "b"}  # a is cleaner but costs 5 points


def test_stratified_subsets_are_balanced_and_nested(clean_dir: Path) -> None:
    from bdaudit.core.data import Preprocessing, load_image_folder

    pool: ImageSet = load_image_folder(clean_dir, Preprocessing(in_chans=1, input_size=(28, 28)))
    small, large = stratified_subset(pool, 50, 0), stratified_subset(pool, 250, 0)
    assert set(small.counts().values()) == {5} and set(large.counts().values()) == {25}
    assert {bytes(x.numpy()) for x in small.images} <= {bytes(x.numpy()) for x in large.images}


@pytest.mark.parametrize("extra, fragment", [
    (("--methods", "sft,nosuch"), "unknown method"),
    (("--set", "epochs=3"), "METHOD.KEY=VALUE"),
    (("--clean-size", "5000"), "too few images"),
    (("--clean-fraction", "0.1"), "--train-size"),
    (("--set", "ft.unlearn_source=guess"), "unlearn_source must be one of"),
])
def test_bad_bench_input_exits_2(manifest: Path, clean_dir: Path, eval_dir: Path, tmp_path: Path,
                                 extra: tuple[str, ...], fragment: str) -> None:
    result = invoke("bench", "--models", manifest, "--clean-data", clean_dir, "--eval-data", eval_dir,
                    "--out-dir", tmp_path, "--no-sequela", "--methods", "ft", *extra)
    assert_usage_error(result, fragment)


def test_bench_needs_exactly_one_model_source(clean_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    result = invoke("bench", "--clean-data", clean_dir, "--eval-data", eval_dir, "--out-dir", tmp_path)
    assert_usage_error(result, "exactly one source of models")


def rerun_with(out: Path, manifest: Path, clean_dir: Path, eval_dir: Path, methods: str,
               *sets: str) -> list[dict]:
    """Bench the tiny model into ``out`` (whose cache holds the module's ft/sft cells); its cells."""
    result = invoke("bench", "--models", manifest, "--clean-data", clean_dir, "--eval-data", eval_dir,
                    "--methods", methods, "--clean-size", "100", "--set", "ft.epochs=3",
                    *[arg for item in sets for arg in ("--set", item)],
                    "--reinjection-steps", "10", "--out-dir", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads((out / "bench.json").read_text())


def test_a_variant_label_runs_a_method_with_its_own_settings(bench_run: tuple, manifest: Path, clean_dir: Path,
                                                             eval_dir: Path) -> None:
    report = rerun_with(bench_run[1], manifest, clean_dir, eval_dir, "ft,ft_cosine=ft",
                        "ft_cosine.epochs=3", "ft_cosine.schedule=cosine")
    assert [c["method"] for c in report["cells"]] == ["ft", "ft_cosine"]
    assert report["reused"] == 1 and report["computed"] == 1  # plain ft came from the cache
    assert report["cells"][1]["settings"]["schedule"] == "cosine"


def test_any_method_takes_trigger_unlearning_as_a_variant(bench_run: tuple, manifest: Path, clean_dir: Path,
                                                          eval_dir: Path) -> None:
    report = rerun_with(bench_run[1], manifest, clean_dir, eval_dir, "ft,ft_u=ft",
                        "ft_u.epochs=3", "ft_u.unlearn_fraction=0.3")
    plain, unlearned = report["cells"]
    assert plain["unlearning"] is None and unlearned["unlearning"]["triggers"] == ["badnets"]
    assert unlearned["asr_after"] < 0.05 < 0.3 < plain["asr_after"]


def test_planted_subjects_are_planted_once_then_reused(train_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    from bdaudit import api

    planted: list[str] = []
    options = api.PlantOptions(arch="bd_cnn_tiny", poison_rate=0.1, target=2, epochs=1)
    runtime = api.Runtime("cpu", 128, 3)
    first = api.plant_subjects(api.DataOptions(train_dir, eval_dir), ["badnets"], tmp_path, options, runtime,
                               on_plant=planted.append)
    assert planted == ["badnets"] and first[0].path == tmp_path / "badnets-bd_cnn_tiny-p0.1-t2-s3.safetensors"
    assert (first[0].trigger, first[0].target) == ("badnets", 2)
    provenance = api.ModelOptions(first[0].path).load().config.provenance
    assert provenance["paradigm"] == "standalone" and provenance["train"]["epochs"] == 1
    assert provenance["seed"] == 3 and provenance["train"]["batch_size"] == 128
    again = api.plant_subjects(api.DataOptions(train_dir, eval_dir), ["badnets"], tmp_path, options, runtime,
                               on_plant=planted.append)
    assert planted == ["badnets"] and again == first


def test_a_defense_revision_recomputes_its_cached_cells(bench_run: tuple, manifest: Path, clean_dir: Path,
                                                        eval_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # A fix that changes what a defense does (nc's min_steps) must not be answered from old cells.
    from bdaudit.defenses import DEFENSES

    out = tmp_path / "out"
    shutil.copytree(bench_run[1], out)
    assert rerun_with(out, manifest, clean_dir, eval_dir, "ft")["reused"] == 1
    monkeypatch.setattr(DEFENSES["ft"], "revision", 1)
    report = rerun_with(out, manifest, clean_dir, eval_dir, "ft")
    assert report["computed"] == 1 and report["reused"] == 0
