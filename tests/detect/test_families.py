"""The unknown-trigger detector's family registry: adding a family is one module + one registry line."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from torch import nn

from bdaudit.core.data import load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.detect.families import (
    DETECTOR_FAMILIES,
    DetectorFamily,
    FamilyJob,
    FamilyResult,
    family_names,
    register_family,
)
from bdaudit.detect.unknown import DetectSettings, detect_reasons, detect_unknown
from bdaudit.planting.plant import infer_model_config


def test_the_four_families_are_registered_in_report_order() -> None:
    assert family_names() == ("patch", "perturbation", "transform", "square")
    assert [DETECTOR_FAMILIES[n].per_candidate for n in family_names()] == [True, True, False, False]
    assert DetectSettings().families == family_names()


@pytest.mark.parametrize("families", [("patch", "colour"), ()])
def test_an_unregistered_family_is_refused_by_field_name(families: tuple[str, ...]) -> None:
    with pytest.raises(BdauditError, match=r"`families` must be among the registered detector families "
                                           r"patch, perturbation, transform, square"):
        DetectSettings(families=families)


class _Toy(DetectorFamily):
    """Calls nothing: reports class 0 as the smallest trigger and records what it was asked."""

    name: ClassVar[str] = "toy"
    size_unit: ClassVar[str] = "toy units"

    def __init__(self, per_candidate: bool) -> None:
        self.per_candidate = per_candidate  # type: ignore[misc]
        self.calls: list[tuple[list[int], int]] = []

    def run(self, job: FamilyJob) -> FamilyResult:
        self.calls.append((list(job.classes), job.steps))
        sizes = [0.1 if c == 0 else 1.0 for c in job.classes]
        # Screen-loop toy: ambiguous (index 5, nothing flagged), so the detector must refine it.
        flagged = [] if self.per_candidate else [0]
        return FamilyResult(family=self.name, classes=list(job.classes), sizes=sizes, attack_success=[1.0] * len(sizes),
                            anomaly_index=[5.0 if c == 0 else 0.0 for c in job.classes], flagged=flagged,
                            triggers={}, seconds=0.0, size_unit=self.size_unit)


@pytest.mark.parametrize("per_candidate", [True, False])
def test_a_family_registered_in_one_line_is_run_and_reported(eval_dir: Path, per_candidate: bool) -> None:
    config = infer_model_config(eval_dir, "bd_cnn_small")
    images = load_image_folder(eval_dir, resolve_preprocessing(config), config.class_names)
    model = nn.Sequential(nn.Flatten(), nn.Linear(images.images[0].numel(), images.num_classes))
    toy = _Toy(per_candidate)
    register_family(toy)
    try:
        settings = DetectSettings(steps=3, refine_steps=7, families=("toy",))
        result = detect_unknown(model, images, seed=0, settings=settings)
    finally:
        DETECTOR_FAMILIES.pop("toy")
    everyone = list(range(images.num_classes))
    if per_candidate:  # inside screen -> refine: run at both budgets, and the refined result is kept
        assert toy.calls == [(everyone, 3), (everyone, 7)] and result.refined is not None
    else:  # once, over every class, after the loop
        assert toy.calls == [(everyone, 3)] and result.refined is None
    summary = result.to_dict()
    assert [f["family"] for f in summary["families"]] == ["toy"]
    assert summary["families"][0]["size_unit"] == "toy units"
    assert result.flagged == ([] if per_candidate else [0])
    reasons = detect_reasons(summary)
    assert len(reasons) == (0 if per_candidate else 1) and all("toy trigger of toy units" in r for r in reasons)
    assert "toy" not in family_names()


@pytest.mark.parametrize("field", ["steps", "batch_size", "patch_batch_size", "compact_tests"])
def test_a_budget_below_one_is_refused(field: str) -> None:
    with pytest.raises(BdauditError, match="detector steps, batch sizes"):
        DetectSettings(**{field: 0})


def test_each_inverting_family_searches_with_its_own_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # The patch family only nominates (its compact patch decides), so it affords fewer images per step
    # than the perturbation family, whose index gates.
    import torch

    from bdaudit.core.data import ImageSet
    from bdaudit.detect.families import patch, perturbation

    seen: dict[str, int] = {}

    def spy(name: str, result: object) -> object:
        def run(classifier: object, images: object, labels: object, targets: list[int], nc: object,
                *args: object) -> object:
            seen[name] = nc.batch_size  # type: ignore[attr-defined]
            return result(len(targets))  # type: ignore[operator]
        return run

    monkeypatch.setattr(patch, "_invert_group", spy("patch", lambda k: (torch.ones(k, 1, 8, 8),
                                                                         torch.ones(k, 1, 8, 8), None)))
    monkeypatch.setattr(perturbation, "invert_perturbation", spy("perturbation", lambda k: (torch.ones(k, 1, 8, 8),
                                                                                             [0.0] * k)))
    images = ImageSet(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 2, ("a", "b"))
    s = DetectSettings(batch_size=16, patch_batch_size=12)
    for name in ("patch", "perturbation"):
        job = FamilyJob(nn.Identity(), images, [0, 1], s, 1, torch.device("cpu"), torch.Generator().manual_seed(0))
        DETECTOR_FAMILIES[name].invert(job)  # type: ignore[attr-defined]
    assert seen == {"patch": 12, "perturbation": 16}
