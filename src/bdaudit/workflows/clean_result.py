"""What ``clean`` found, as one typed result that knows its report sections and gate reasons:
the defense's outcome, the detector before cleaning and its fresh-seed check after, the inversion
(with ``invert``) and the sequela audit (if asked)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdaudit.defenses import Defense
from bdaudit.detect.inversion import InversionResult
from bdaudit.detect.unknown import DetectResult, detect_reasons
from bdaudit.sequela.audit import SequelaAudit
from bdaudit.workflows.clean import CleanGates, CleanOutcome, clean_reasons, clean_section
from bdaudit.workflows.scan import detection_section, scan_section


@dataclass
class CleanFindings:
    outcome: CleanOutcome
    defense: Defense
    scope: str
    out: Path | None
    gates: CleanGates
    class_names: list[str]
    detect_mode: str
    detection: DetectResult | None = None
    verification: DetectResult | None = None  # the detector again on the cleaned model, fresh seed
    inversion: InversionResult | None = None
    sequela: SequelaAudit | None = None

    @property
    def still_flagged(self) -> list[int]:
        """Classes flagged before cleaning and again, from scratch, after it."""
        if self.detection is None or self.verification is None:
            return []
        return [c for c in self.verification.flagged if c in self.detection.flagged]

    def sections(self) -> dict[str, dict[str, Any]]:
        sections = {"scan": scan_section(self.outcome.after),
                    "clean": clean_section(self.defense, self.scope, self.outcome, self.out)}
        if self.inversion is not None:
            sections["inversion"] = self.inversion.to_dict()
        sections["detection"] = detection_section(self.detection, self.detect_mode)
        sections["clean"]["finding"] = self.finding()
        if self.verification is not None and self.detection is not None:
            sections["verification"] = {
                **detection_section(self.verification, "on"), "before_flagged": self.detection.flagged,
                "still_flagged": self.still_flagged,
                "new_flagged": [c for c in self.verification.flagged if c not in self.detection.flagged]}
        if self.sequela is not None:
            sections.update(self.sequela.sections())
        return sections

    def finding(self) -> str:
        """What was found before cleaning. A detector *suspect* (brightening that sends most images to one
        class) is probed and unlearned, but clean models do it too, so a confirmed suspect alone is not
        called a backdoor: ``scan`` passes such a model, and ``clean`` must not say otherwise."""
        suspects = {t.spec() for t in self.detection.suspect_triggers()} if self.detection is not None else set()
        flagged = [t for t in self.outcome.before.flagged if t.spec not in suspects]
        if flagged or (self.detection is not None and self.detection.flagged):
            return "backdoor detected"
        if self.outcome.before.flagged:
            return "suspect only (a brightening response, not gated); tuned anyway"
        return "no backdoor detected; tuned anyway"

    def reasons(self) -> list[str]:
        reasons = clean_reasons(self.outcome, self.gates)
        if self.verification is not None:
            # A class reversed, unlearned and reversed again is a finding. A class flagged only after
            # tuning is reported, not gated: tuning on a few hundred images shifts every class's margin,
            # and on the blind benchmark such new flags were naturally easy classes (benchmarks/README.md).
            summary = detection_section(self.verification, "on")
            reasons += [line for line in detect_reasons(summary, " after cleaning (fresh seed)")
                        if any(f"class {self.class_names[c]!r}" in line for c in self.still_flagged)]
        if self.sequela is not None:
            reasons += self.sequela.reasons()
        return reasons

    def gate_values(self) -> dict[str, float | None]:
        gates: dict[str, float | None] = self.gates.to_dict()
        if self.sequela is not None:
            gates.update(self.sequela.gates.to_dict())
        return gates
