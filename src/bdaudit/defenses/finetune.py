"""Conventional fine-tuning on clean data — the baseline Sha et al. (arXiv:2212.09067) contrast
with SFT (and the first step of many defenses, e.g. Liu et al. 2018, Fine-Pruning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.tuning import RateSettings, fine_tune


@dataclass(frozen=True)
class FTSettings(RateSettings):
    """lr 0.01, constant (or cosine) — ``RateSettings``' defaults."""


@register_defense
class FineTuning(Defense):
    name = "ft"
    paper = "Conventional fine-tuning baseline (as in Sha et al. 2022, arXiv:2212.09067)"
    needs = "clean labelled data"

    settings_cls = FTSettings
    settings: FTSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        fine_tune(ctx, s, s.lr_function(len(ctx.tune)))
        return DefenseResult(asdict(s))
