"""Trigger unlearning: tune on clean images that carry the triggers the pre-clean scan flagged,
with their *true* labels, so the tuning data itself contradicts "trigger -> target".

Plain and super-fine-tuning only see clean images, so they can only hope to leave the backdoor's
basin; a backdoor that clean data never exercises (a noise blend, a low-frequency tint) has no
gradient pushing it out. Neural Cleanse, i-BAU and BTI-DBF unlearn a *reverse-engineered* trigger
this way; bdaudit already knows a working trigger when its scan flagged one, so it unlearns that.
Half of the stamped images get a fresh member of the trigger's family (same parameters, another
seed) rather than the flagged instance, so the model unlearns the family — what Blended, WaNet and
low-frequency backdoors actually learn — not one pattern. Images are stamped before augmentation.

It applies to every defense that tunes through ``tuning.fine_tune`` (ft, sft, ftsam, fst, nad, fp, nc)
and only when the scan flagged something: a model without a flagged trigger is tuned as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bdaudit.engine.stamping import Stamping, check_share
from bdaudit.triggers import Trigger

# Share of stamped images that get a fresh member of the family instead of the flagged instance.
UNLEARN_FAMILY_SHARE = 0.5


def check_unlearn_fraction(fraction: float) -> None:
    check_share(fraction, "unlearn_fraction", allow_zero=True, allow_one=False)  # 1: no clean image left


@dataclass(frozen=True)
class TriggerUnlearning(Stamping):
    """A ``train`` batch transform: stamps ``fraction`` of each batch with a flagged trigger (or,
    with probability ``family``, a fresh member of its family) and keeps the labels."""

    triggers: tuple[Trigger, ...]
    family: float = UNLEARN_FAMILY_SHARE

    def __post_init__(self) -> None:
        check_unlearn_fraction(self.fraction)
        check_share(self.family, "unlearn_family", allow_zero=True, allow_one=True)

    def describe(self) -> dict[str, Any]:
        return {"triggers": [t.spec() for t in self.triggers], "fraction": self.fraction,
                "family_share": self.family}


def plan_unlearning(triggers: Sequence[Trigger], flagged: Sequence[bool], fraction: float,
                    family: float = UNLEARN_FAMILY_SHARE) -> TriggerUnlearning | None:
    """The unlearning transform for the flagged triggers, or None when nothing was flagged."""
    chosen = tuple(t for t, hit in zip(triggers, flagged, strict=True) if hit)
    plan = TriggerUnlearning(chosen, fraction, family)  # validates the numbers either way
    return plan if chosen and fraction > 0.0 else None
