"""``patch``: Neural Cleanse's mask + pattern (``inversion._invert_group``) — the smallest *region*
that sends clean images to a class. Finds BadNets-like patches of any pattern, size or position;
blind to triggers spread over the whole image (blends, warps, colour shifts, frequency patterns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from bdaudit.detect.families.base import FamilyJob, InvertingFamily
from bdaudit.detect.inversion import InversionSettings, InvertedTrigger, _invert_group
from bdaudit.triggers.base import Trigger

if TYPE_CHECKING:
    from bdaudit.detect.unknown import DetectSettings


class PatchFamily(InvertingFamily):
    name: ClassVar[str] = "patch"
    size_unit: ClassVar[str] = "mask L1 (pixels)"

    def threshold(self, settings: DetectSettings) -> float:
        return settings.patch_threshold

    def invert(self, job: FamilyJob) -> tuple[list[float], dict[int, Trigger]]:
        candidates = job.classes
        nc = InversionSettings(steps=job.steps, batch_size=job.settings.batch_size, lr=job.settings.lr,
                               class_group=len(candidates))
        masks, patterns, _ = _invert_group(job.classifier, job.images.images, job.images.labels, candidates, nc,
                                           job.device, job.gen)
        triggers: dict[int, Trigger] = {c: InvertedTrigger(mask=masks[i].clone(), pattern=patterns[i].clone(),
                                                           target_class=c) for i, c in enumerate(candidates)}
        return masks.flatten(1).sum(1).tolist(), triggers
