"""Many models in one command: which checkpoints a MODEL argument names, and the batch report.

A batch is a list of ``ModelEntry`` (from several paths, a directory of checkpoints or a manifest
YAML); each model yields its own ``Report`` or a one-line error, and ``BatchReport`` holds them all
plus a summary (``summary.json``): which model failed which gate, and the worst exit code.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from bdaudit import __version__
from bdaudit.core.errors import BdauditError
from bdaudit.models.checkpoint import TORCH_SUFFIXES, atomic_output
from bdaudit.models.intake import is_model_folder
from bdaudit.report.document import Report

BATCH_VERSION = "1.0.0"
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # unique in the batch; the per-model report is <name>.json
    path: Path


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _from_manifest(path: Path) -> list[tuple[str, Path]]:
    try:
        entries = yaml.safe_load(path.read_text())["models"]
        return [(str(name), path.parent / entry["file"]) for name, entry in entries.items()]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise BdauditError(f"cannot read model manifest {path}: {exc}; expected a YAML file with a 'models' "
                           "mapping of name -> {file: PATH} (see sample_models/manifest.yaml)") from None


def is_one_model(path: Path) -> bool:
    """A path the loader takes as one model: a file, a timm/HF model folder (config.json + weights), or
    a folder named like a checkpoint (the loader then says why it is not one)."""
    return not path.is_dir() or is_model_folder(path) or path.suffix in CHECKPOINT_SUFFIXES


def _from_directory(path: Path) -> list[tuple[str, Path]]:
    found: list[Path] = []
    for folder, dirs, files in os.walk(path):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in list(dirs):
            if is_model_folder(here / name):  # a model folder is one model, not a folder of checkpoints
                found.append(here / name)
                dirs.remove(name)
        found += [here / f for f in files if not f.startswith(".") and Path(f).suffix in CHECKPOINT_SUFFIXES]
    found.sort()
    if not found:
        raise BdauditError(f"{path} holds no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); name model files, "
                           "a folder of them or a manifest .yaml")
    return [(str(p.relative_to(path).with_suffix("")), p) for p in found]


def resolve_models(paths: Sequence[str | Path]) -> list[ModelEntry]:
    """Checkpoint files as given, a directory's checkpoints (recursively, sorted) or a manifest's
    entries (files relative to it). A missing file stays in the list: it fails to load on its own
    and the other models still run."""
    if not paths:
        raise BdauditError("name at least one model: a checkpoint, a folder of checkpoints or a manifest .yaml")
    named: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if not is_one_model(path):
            named += _from_directory(path)
        elif path.suffix in MANIFEST_SUFFIXES:
            named += _from_manifest(path)
        else:
            named.append((path.stem, path))
    entries, seen = [], set()
    for name, path in named:
        unique, n = _safe_name(name), 2
        while unique in seen:  # e.g. a/model.pt and b/model.pt given as files
            unique, n = f"{_safe_name(name)}-{n}", n + 1
        seen.add(unique)
        entries.append(ModelEntry(unique, path))
    return entries


def is_batch(paths: Sequence[str | Path]) -> bool:
    """Several models, a folder or a manifest (a single checkpoint keeps the one-report output)."""
    return len(paths) != 1 or not is_one_model(Path(paths[0])) or Path(paths[0]).suffix in MANIFEST_SUFFIXES


@dataclass
class ModelOutcome:
    entry: ModelEntry
    report: Report | None = None
    error: str | None = None
    error_code: int = 2

    @property
    def status(self) -> str:
        if self.report is None:
            return "error"
        return "pass" if self.report.passed else "fail"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1}.get(self.status, self.error_code)

    def to_dict(self, report_file: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.entry.name, "path": str(self.entry.path), "status": self.status,
                               "exit_code": self.exit_code, "report": report_file, "error": self.error,
                               "reasons": [], "flagged_triggers": []}
        if self.report is not None:
            scan = self.report.sections.get("scan", {})
            row.update(reasons=list(self.report.reasons), clean_accuracy=scan.get("clean_accuracy"),
                       flagged_triggers=[{k: t.get(k) for k in ("spec", "target", "target_name", "asr",
                                                                 "null_asr", "flag_reason")}
                                         for t in scan.get("triggers", []) if t.get("flagged")])
        return row


@dataclass
class BatchReport:
    """Per-model outcomes in input order; the exit code is the worst of them (3 > 2 > 1 > 0)."""

    kind: str
    outcomes: list[ModelOutcome]
    executor: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    report_dir: Path | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def exit_code(self) -> int:
        return max((o.exit_code for o in self.outcomes), default=0)

    def counts(self) -> dict[str, int]:
        return {s: sum(o.status == s for o in self.outcomes) for s in ("pass", "fail", "error")}

    def to_dict(self) -> dict[str, Any]:
        return {"batch_version": BATCH_VERSION, "kind": self.kind,
                "tool": {"name": "bdaudit", "version": __version__}, "created": self.created,
                "wall_time_s": round(self.wall_time_s, 3), "executor": self.executor,
                "exit_code": self.exit_code, "counts": self.counts(),
                "models": [o.to_dict(report_file(o, self.report_dir)) for o in self.outcomes]}

    def write_json(self, destination: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if str(destination) == "-":
            sys.stdout.write(text)
            return
        with atomic_output(Path(destination), force=True) as tmp:
            tmp.write_text(text)


def report_file(outcome: ModelOutcome, report_dir: Path | None) -> str | None:
    """``<name>.json`` in the report folder, for models that produced a report."""
    if report_dir is None or outcome.report is None:
        return None
    return f"{outcome.entry.name}.json"
