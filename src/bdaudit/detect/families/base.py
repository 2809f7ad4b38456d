"""What a family of the unknown-trigger detector is, and the registry ``detect_unknown`` iterates.

A family is one way of searching for a trigger no library holds. A *per-candidate* family
(``patch``, ``perturbation``: an ``InvertingFamily``) reverses a trigger for each candidate class
inside the detector's screen -> refine loop, at the loop's step budget, and is scored with Neural
Cleanse's MAD rule (``score_inverted``; ``patch`` then confirms with a compact patch); a
*whole-grid* family (``transform``, ``square``) runs once, over every class, before that loop.
Adding a family is one module with a ``DetectorFamily`` subclass plus one ``register_family`` line
in ``bdaudit/detect/families/__init__.py``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.core.predict import Predictor
from bdaudit.detect.inversion import score_classes
from bdaudit.triggers.base import Trigger

if TYPE_CHECKING:
    from bdaudit.detect.unknown import DetectSettings


@dataclass
class FamilyResult:
    family: str
    classes: list[int]
    sizes: list[float]
    attack_success: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    triggers: dict[int, Trigger]
    seconds: float
    suspects: list[int] = field(default_factory=list)  # over the line but not gating (transform family)
    size_unit: str = ""
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)  # per class, added to its report row

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        rows = [{"class": c, "name": class_names[c] if c < len(class_names) else str(c),
                 "size": round(s, 4), "attack_success": _finite(a),
                 "anomaly_index": _finite(i), "flagged": c in self.flagged, **self.extras.get(c, {})}
                for c, s, a, i in zip(self.classes, self.sizes, self.attack_success, self.anomaly_index,
                                      strict=True)]
        median = sorted(self.sizes)[len(self.sizes) // 2] if self.sizes else None
        return {"family": self.family, "size_unit": self.size_unit, "suspects": list(self.suspects),
                "median_size": None if median is None else round(median, 4), "flagged": list(self.flagged),
                "classes": rows, "seconds": round(self.seconds, 3)}


def _finite(value: float) -> float | None:
    return round(value, 4) if value == value and abs(value) != float("inf") else None


@dataclass
class FamilyJob:
    """What a family runs on: ``classes`` are the candidates (per-candidate families) or every
    class (whole-grid ones); ``steps`` is the screen's or the refinement's budget."""

    classifier: nn.Module  # eval mode, parameters frozen, on ``device``
    images: ImageSet
    classes: list[int]
    settings: DetectSettings
    steps: int
    device: torch.device
    gen: torch.Generator  # the family's own seeded generator (``unknown.family_seed``)
    seed: int = 0  # the detector's seed, for a step that must not draw from ``gen`` (patch's compact tests)
    flagged_before: bool = False  # a family that ran earlier flagged a class (``DetectSettings.confirm_all``)

    def decided(self, result: FamilyResult) -> bool:
        """Whether a gate run has its finding, so that confirmations still due can be skipped."""
        return not self.settings.confirm_all and (self.flagged_before or bool(result.flagged))


class DetectorFamily(ABC):
    """One family of the unknown-trigger detector (module docstring)."""

    name: ClassVar[str]
    size_unit: ClassVar[str]  # what the report's ``size`` column measures
    per_candidate: ClassVar[bool] = True  # False: runs once over every class, outside screen -> refine

    @abstractmethod
    def run(self, job: FamilyJob) -> FamilyResult:
        """Search, score and flag (per-candidate families: ``score_inverted``)."""


class InvertingFamily(DetectorFamily):
    """A per-candidate family that reverses one trigger per class and is judged by their sizes."""

    @abstractmethod
    def invert(self, job: FamilyJob) -> tuple[list[float], dict[int, Trigger]]:
        """Each candidate's trigger size (in ``size_unit``) and trigger."""

    @abstractmethod
    def threshold(self, settings: DetectSettings) -> float:
        """The log MAD anomaly index above which a below-median class is flagged."""

    def run(self, job: FamilyJob) -> FamilyResult:
        started = time.perf_counter()
        sizes, triggers = self.invert(job)
        return score_inverted(self, job, sizes, triggers, self.threshold(job.settings), started)


DETECTOR_FAMILIES: dict[str, DetectorFamily] = {}  # in registration order: the order they run and report


def register_family(family: DetectorFamily) -> DetectorFamily:
    DETECTOR_FAMILIES[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    return tuple(DETECTOR_FAMILIES)


def score_inverted(family: DetectorFamily, job: FamilyJob, sizes: list[float], triggers: dict[int, Trigger],
                   threshold: float, started: float) -> FamilyResult:
    """Flag the candidates whose reversed trigger is an outlier by size (log MAD rule above
    ``threshold``, below the median) and works on at least half of other classes' images."""
    classes = job.classes
    images = job.images
    index, outliers = score_classes(classes, sizes, "log", threshold)
    # The success check only screens out triggers that never worked (>= 0.5 below), so only the
    # outliers it could veto are checked (the others' ``attack_success`` is not measured: NaN): 256
    # images measure it to +-6 points.
    probe = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:job.settings.success_images]
    predictor = Predictor(job.classifier, job.device, 256)
    success = [_success(predictor, images.images[probe], images.labels[probe], triggers[c], c) if c in outliers
               else float("nan") for c in classes]
    # A trigger that never reached the success threshold is no evidence of a shortcut: score it at
    # its size but never flag it (its "small size" only says the optimiser gave up).
    flagged = [c for c in outliers if success[classes.index(c)] >= 0.5]
    return FamilyResult(family=family.name, classes=classes, sizes=sizes, attack_success=success,
                        anomaly_index=index.tolist(), flagged=flagged, triggers=triggers,
                        seconds=time.perf_counter() - started, size_unit=family.size_unit)


def _success(predictor: Predictor, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger,
             target: int) -> float:
    keep = labels != target
    if not keep.any():
        return float("nan")
    preds = predictor.labels(images[keep], [trigger.apply])[0]
    return int((preds == target).sum()) / int(keep.sum())
