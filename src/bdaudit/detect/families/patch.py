"""``patch``: Neural Cleanse's mask + pattern (``inversion._invert_group``) — the smallest *region*
that sends clean images to a class. Finds BadNets-like patches of any pattern, size or position;
blind to triggers spread over the whole image (blends, warps, colour shifts, frequency patterns)."""

from __future__ import annotations

import time
from typing import ClassVar

from bdaudit.detect.families.base import DetectorFamily, FamilyJob, FamilyResult, score_inverted
from bdaudit.detect.inversion import InversionSettings, InvertedTrigger, _invert_group
from bdaudit.triggers.base import Trigger


class PatchFamily(DetectorFamily):
    name: ClassVar[str] = "patch"
    size_unit: ClassVar[str] = "mask L1 (pixels)"

    def run(self, job: FamilyJob) -> FamilyResult:
        started = time.perf_counter()
        s, candidates = job.settings, job.classes
        nc = InversionSettings(steps=job.steps, batch_size=s.batch_size, lr=s.lr, class_group=len(candidates))
        masks, patterns, _ = _invert_group(job.classifier, job.images.images, job.images.labels, candidates, nc,
                                           job.device, job.gen)
        triggers: dict[int, Trigger] = {c: InvertedTrigger(mask=masks[i].clone(), pattern=patterns[i].clone(),
                                                           target_class=c) for i, c in enumerate(candidates)}
        sizes = masks.flatten(1).sum(1).tolist()
        return score_inverted(self, job, sizes, triggers, s.patch_threshold, started)
