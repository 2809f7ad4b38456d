"""Shared set-up for benchmark scripts: sample models, data, one cleaning run."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bdaudit.api import DataOptions, Runtime, open_model_and_data
from bdaudit.core.runtime import resolve_device, seed_everything
from bdaudit.defenses import create_defense
from bdaudit.triggers import parse_trigger
from bdaudit.workflows.clean import DefenseRun, run_defense

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DATA = ROOT / "sample_data" / "mnist"


def emit(row: dict[str, Any], results: Path) -> None:
    """Print one result row and append it to a JSONL file (benchmarks keep every run)."""
    print(json.dumps(row), flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def manifest() -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / "manifest.yaml").read_text())["models"]


def clean_once(model: str, method: str, settings: dict[str, Any], trigger: str, target: int,
               clean_dir: Path = DATA / "clean", seed: int = 0) -> dict[str, Any]:
    """Clean one sample with one method; return CA/ASR before and after and the seconds."""
    runtime = Runtime("cpu", 256, seed)
    loaded, split = open_model_and_data(SAMPLES / f"{model}.safetensors", DataOptions(clean_dir, DATA / "eval"),
                                        runtime)
    started = time.perf_counter()
    outcome = run_defense(create_defense(method, settings), loaded, split, [parse_trigger(trigger)],
                          DefenseRun(target=target, history="off", probe="full"),
                          device=resolve_device("cpu"), gen=seed_everything(seed))
    used = outcome.used
    return {
        "model": model, "method": method, "settings": settings, "clean_images": len(split.tune),
        "ca_before": outcome.before.clean_accuracy, "ca_after": outcome.after.clean_accuracy,
        "asr_before": outcome.before.triggers[0].asr, "asr_after": outcome.after.triggers[0].asr,
        "peak1": (used.get("schedule") or {}).get("lr_peak1"),
        "escape_lr": (used.get("peak_selection") or {}).get("escape_lr"),
        "seconds": round(time.perf_counter() - started, 1),
    }
