"""The report object: one structure rendered to JSON (a versioned contract) and to the console."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from bdaudit import __version__
from bdaudit.models.checkpoint import LoadedModel

# 1.1: trigger flag_reason, family_asr gate; 1.2: clean unlearning; 1.3: detection, verification, ASR CIs, MIA roc;
# 1.4: sequential probing (probe_decided, probe_confidence per trigger; clean's history settings)
# 1.5: clean.accuracy_drop_ci95; 1.6: detector family "square" (square, screen_share per class; refined.families)
# 1.7: patch family's compact-patch confirmation (compact_asr, compact_patch per class)
# 1.8: transform rows' perturbation_index (corroborated brightening suspects); attack_success null where unmeasured
# 1.9: patch rows' compact_confidence (a compact share below compact_sure needs a confident one)
# 1.10: detection settings compact_sure/compact_confidence gone (compact_asr alone gates, after
#       recentring: compact_shift_from/until/steps)
# 1.11: patch rows' nominated_by (the perturbation family's outlier given the compact test)
# 1.12: transform rows' transform_share; settings.transform_gate_asr (geometric/gain transforms gate at 0.6);
#       clean.finding 'suspect only ...' (a confirmed brightening suspect is not called a backdoor)
# 1.13: patch rows' compact_skipped; settings.confirm_all (a gate run stops confirming after a finding)
SCHEMA_VERSION = "1.13.0"


@cache
def report_schema() -> dict[str, Any]:
    """The JSON Schema shipped inside the package (``bdaudit schema`` prints it)."""
    text = resources.files("bdaudit").joinpath("report/schemas/report.schema.json").read_text()
    return json.loads(text)


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``report`` breaks the contract."""
    import jsonschema

    jsonschema.validate(report, report_schema(), format_checker=jsonschema.FormatChecker())


def model_section(loaded: LoadedModel) -> dict[str, Any]:
    config = loaded.config
    return {
        "path": str(loaded.path) if loaded.path else None,
        "sha256": loaded.sha256,
        "arch": config.arch,
        "num_classes": config.num_classes,
        "in_chans": config.in_chans,
        "input_size": list(config.input_size),
        "parameters": loaded.num_parameters,
        "class_names": list(config.class_names) if config.class_names else None,
        "provenance": config.provenance,
    }


class Findings(Protocol):
    """A workflow's typed result: it knows its own report sections and gate reasons."""

    def sections(self) -> dict[str, dict[str, Any]]: ...

    def reasons(self) -> list[str]: ...


@dataclass
class Report:
    """A scan/clean/sequela report; sections are plain JSON-ready dicts."""

    kind: str
    model: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    gates: dict[str, float | None]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    # Live objects the JSON leaves out (e.g. the inversion's mask tensors) for richer renderers.
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, kind: str, findings: list[Findings], **fields: Any) -> Report:
        """A report whose sections and reasons come from ``findings``, in order (a later section
        of the same name replaces an earlier one)."""
        sections: dict[str, dict[str, Any]] = {}
        reasons: list[str] = []
        for part in findings:
            sections.update(part.sections())
            reasons += part.reasons()
        return cls(kind=kind, sections=sections, reasons=reasons, **fields)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "tool": {"name": "bdaudit", "version": __version__},
            "created": self.created,
            "wall_time_s": round(self.wall_time_s, 3),
            "model": self.model,
            "data": self.data,
            "environment": self.environment,
            "gates": self.gates,
            **self.sections,
            "verdict": {"status": "pass" if self.passed else "fail", "reasons": self.reasons},
        }

    def write_json(self, destination: str | Path, force: bool = True) -> None:
        """Write to a path atomically, or to stdout for ``-``."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if str(destination) == "-":
            sys.stdout.write(text)
            return
        from bdaudit.core.outputs import write_output

        write_output(destination, text, force=force)
