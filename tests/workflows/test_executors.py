"""Executors: many models per command, and the same numbers, resume and failure handling on a local
Ray instance (2 CPUs, started once) as in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import assert_usage_error, invoke

from bdaudit.planting.plant import PlantResult

ROOT = Path(__file__).resolve().parents[2]
BENCH_ARGS = ("--methods", "ft,ft_hot=ft", "--clean-size", "50", "--set", "ft.min_steps=20",
              "--set", "ft_hot.min_steps=20", "--set", "ft_hot.lr=0.05", "--no-sequela", "--device", "cpu", "--quiet")
SCAN_ARGS = ("-t", "badnets", "-t", "blended", "--device", "cpu", "--quiet")
VOLATILE = {"seconds", "wall_time_s", "created"}


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[object]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def registry(badnets_model: PlantResult, clean_model: PlantResult,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three loadable models and one that is not a checkpoint, as a folder and as a manifest."""
    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(badnets_model.path, folder / "a_badnets.safetensors")
    shutil.copy(clean_model.path, folder / "b_clean.safetensors")
    shutil.copy(badnets_model.path, folder / "c_badnets_copy.safetensors")
    (folder / "d_broken.safetensors").write_bytes(b"not a checkpoint")
    names = sorted(p.stem for p in folder.iterdir())
    (folder / "manifest.yaml").write_text(yaml.safe_dump({"models": {n: {"file": f"{n}.safetensors"} for n in names}}))
    return folder


@pytest.fixture(scope="module")
def bench_manifest(badnets_model: PlantResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_manifest") / "manifest.yaml"
    path.write_text(yaml.safe_dump({"models": {"tiny_badnets": {
        "file": str(badnets_model.path), "attack": "badnets", "trigger": "badnets", "target": 0}}}))
    return path


def stable(value: object) -> object:
    """A report or row without its timings."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def bench(manifest: Path, clean_dir: Path, eval_dir: Path, out: Path, *extra: str) -> dict:
    result = invoke("bench", "--models", manifest, "--clean-data", clean_dir, "--eval-data", eval_dir,
                    "--out-dir", out, *BENCH_ARGS, *extra)
    assert result.exit_code == 0, (result.output, result.stderr)
    return json.loads((out / "bench.json").read_text())


def test_bench_on_ray_matches_local_and_resumes_only_missing_cells(
        ray_instance: object, bench_manifest: Path, clean_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    local = bench(bench_manifest, clean_dir, eval_dir, tmp_path / "local")
    remote = bench(bench_manifest, clean_dir, eval_dir, tmp_path / "ray", "--executor", "ray")
    assert local["computed"] == remote["computed"] == 2 and remote["environment"]["executor"]["name"] == "ray"
    # Bit-identical metrics, in the same (grid) order whatever order the tasks finished in.
    assert stable(remote["cells"]) == stable(local["cells"])
    assert local["cells"][0]["ca_after"] != local["cells"][1]["ca_after"]  # two really different cells

    again = bench(bench_manifest, clean_dir, eval_dir, tmp_path / "ray", "--executor", "ray")
    assert again["computed"] == 0 and again["reused"] == 2

    # Killed mid-run: the second cell's line was never completed. Only that cell runs again.
    cache = tmp_path / "ray" / "cells.jsonl"
    first, second = cache.read_text().splitlines()
    cache.write_text(first + "\n" + second[: len(second) // 2])
    resumed = bench(bench_manifest, clean_dir, eval_dir, tmp_path / "ray", "--executor", "ray")
    assert resumed["computed"] == 1 and resumed["reused"] == 1
    assert stable(resumed["cells"]) == stable(local["cells"])


def test_a_failing_cell_is_reported_not_cached_and_alone_rerun(
        bench_manifest: Path, clean_dir: Path, eval_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bdaudit.workflows.bench as bench_module

    real = bench_module.run_cell

    def flaky(subject, model_data, split, method, settings, plan, *args, **kwargs):  # noqa: ANN001, ANN202
        if "lr" in settings:  # the ft_hot cell
            raise RuntimeError("simulated crash in one cell")
        return real(subject, model_data, split, method, settings, plan, *args, **kwargs)

    monkeypatch.setattr(bench_module, "run_cell", flaky)
    result = invoke("bench", "--models", bench_manifest, "--clean-data", clean_dir, "--eval-data", eval_dir,
                    "--out-dir", tmp_path, *BENCH_ARGS)
    assert result.exit_code == 3, result.output
    assert "simulated crash in one cell" in result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["computed"] == 1 and report["failed"] == 1
    failed = [c for c in report["cells"] if "error" in c]
    assert [c["method"] for c in failed] == ["ft_hot"] and len(report["summary"]) == 1
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 1  # the failure is not cached

    monkeypatch.setattr(bench_module, "run_cell", real)
    fixed = bench(bench_manifest, clean_dir, eval_dir, tmp_path)
    assert fixed["computed"] == 1 and fixed["reused"] == 1 and fixed["failed"] == 0


def scan_registry(source: Path, data: Path, out: Path, *extra: str) -> tuple[object, dict]:
    result = invoke("scan", source, "--data", data, "--report-dir", out, *SCAN_ARGS, *extra)
    return result, json.loads((out / "summary.json").read_text())


def test_scanning_a_registry_on_ray_gives_the_local_reports(
        ray_instance: object, registry: Path, eval_dir: Path, tmp_path: Path) -> None:
    local, local_summary = scan_registry(registry, eval_dir, tmp_path / "local")
    remote, remote_summary = scan_registry(registry / "manifest.yaml", eval_dir, tmp_path / "ray",
                                           "--executor", "ray")
    # A checkpoint that does not load is exit 2 for the batch; the three others still ran.
    assert local.exit_code == remote.exit_code == 2
    statuses = {m["name"]: m["status"] for m in local_summary["models"]}
    assert statuses == {"a_badnets": "fail", "b_clean": "pass", "c_badnets_copy": "fail", "d_broken": "error"}
    assert {m["name"]: m["status"] for m in remote_summary["models"]} == statuses
    broken = local_summary["models"][3]
    assert broken["report"] is None and "d_broken" in broken["error"] and "d_broken" in local.stderr
    assert "badnets" in [t["spec"] for t in local_summary["models"][0]["flagged_triggers"]]
    for name in ("a_badnets", "b_clean", "c_badnets_copy"):
        here = json.loads((tmp_path / "local" / f"{name}.json").read_text())
        there = json.loads((tmp_path / "ray" / f"{name}.json").read_text())
        assert stable(here["scan"]) == stable(there["scan"]) and here["verdict"] == there["verdict"]
    assert not (tmp_path / "local" / "d_broken.json").exists()


def test_ray_tasks_fail_one_by_one_with_their_exit_codes(ray_instance: object) -> None:
    from bdaudit.core.runtime import resolve_device
    from bdaudit.workflows.executors import create_executor

    with create_executor("ray") as engine:
        outcomes = {o.index: o for o in engine.map(int, [("7",), ("x",)])}
        bad_input = next(iter(engine.map(resolve_device, [("tpu",)])))
    assert outcomes[0].ok and outcomes[0].value == 7
    assert outcomes[1].exit_code == 3 and "ValueError" in outcomes[1].error
    assert bad_input.exit_code == 2 and "`device` must be one of" in bad_input.error
    assert ray_instance.is_initialized()  # an executor that joined Ray leaves it running


def test_batch_exit_code_is_the_worst_model(badnets_model: PlantResult, clean_model: PlantResult,
                                            eval_dir: Path, tmp_path: Path) -> None:
    passed = invoke("scan", clean_model.path, clean_model.path, "--data", eval_dir, *SCAN_ARGS,
                    "--json", tmp_path / "pass.json")
    gate = invoke("scan", clean_model.path, badnets_model.path, "--data", eval_dir, *SCAN_ARGS)
    assert (passed.exit_code, gate.exit_code) == (0, 1), (passed.output, gate.output)
    names = [m["name"] for m in json.loads((tmp_path / "pass.json").read_text())["models"]]
    assert names == ["clean", "clean-2"]  # the same file twice: two reports, two names
    assert "FAIL badnets" in gate.output


def test_clean_many_writes_one_cleaned_checkpoint_per_model(badnets_model: PlantResult, clean_model: PlantResult,
                                                            eval_dir: Path, tmp_path: Path) -> None:
    result = invoke("clean", badnets_model.path, clean_model.path, "--data", eval_dir, "--out", tmp_path / "cleaned",
                    "--method", "ft", "--epochs", "1", "--set", "min_steps=10", "--no-sequela",
                    "--report-dir", tmp_path / "reports", *SCAN_ARGS)
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert result.exit_code == summary["exit_code"] < 2, (result.output, result.stderr)
    assert sorted(p.name for p in (tmp_path / "cleaned").iterdir()) == ["badnets.safetensors", "clean.safetensors"]
    assert summary["kind"] == "clean" and [m["report"] for m in summary["models"]] == ["badnets.json", "clean.json"]


def test_executor_ray_without_ray_installed_is_one_clear_exit_2(
        clean_model: PlantResult, eval_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = invoke("scan", clean_model.path, "--data", eval_dir, "--executor", "ray")
    assert_usage_error(result, "pip install 'bdaudit[ray]'")
    # ... while the local executor, the default, never needs it, for one model or many.
    for models in ([clean_model.path], [clean_model.path, clean_model.path]):
        local = invoke("scan", *models, "--data", eval_dir, *SCAN_ARGS, "--executor", "local")
        assert local.exit_code == 0, (local.output, local.stderr)
    assert_usage_error(invoke("scan", clean_model.path, "--data", eval_dir, "--executor", "dask"),
                       "--executor must be one of")


def test_an_unreachable_ray_address_fails_fast_with_exit_2(clean_model: PlantResult, eval_dir: Path) -> None:
    result = invoke("scan", clean_model.path, "--data", eval_dir, "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert_usage_error(result, "cannot reach the Ray cluster at 127.0.0.1:1")


def test_cpu_evaluation_never_autocasts_and_a_bad_device_is_one_error(
        clean_model: PlantResult, eval_dir: Path) -> None:
    import contextlib

    import torch

    from bdaudit.core.runtime import eval_autocast

    # bf16 is a CUDA-only speed-up; CPU numbers must stay exact fp32 (and bit-identical across executors).
    assert isinstance(eval_autocast(torch.device("cpu")), contextlib.nullcontext)
    result = invoke("scan", clean_model.path, clean_model.path, "--data", eval_dir, "--device", "tpu")
    assert_usage_error(result, "--device must be one of")


def test_importing_bdaudit_does_not_import_ray() -> None:
    """A fresh interpreter: every command module loads without pulling Ray in (the lazy import)."""
    code = "import sys, bdaudit.cli, bdaudit.api, bdaudit.workflows.bench; assert 'ray' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
