"""Conventional fine-tuning on clean data — the baseline Sha et al. (arXiv:2212.09067) contrast
with SFT (and the first step of many defenses, e.g. Liu et al. 2018, Fine-Pruning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bdaudit.defenses.base import Defense, DefenseContext, register_defense
from bdaudit.defenses.tuning import TuneSettings, fine_tune
from bdaudit.errors import BdauditError
from bdaudit.schedules import Constant, Cosine


@dataclass(frozen=True)
class FTSettings(TuneSettings):
    lr: float = 0.01
    schedule: str = "constant"  # or cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.lr <= 10.0:
            raise BdauditError(f"--lr must be in (0, 10], not {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise BdauditError(f"--schedule must be constant or cosine, not '{self.schedule}'")


@register_defense
class FineTuning(Defense):
    name = "ft"
    paper = "Conventional fine-tuning baseline (as in Sha et al. 2022, arXiv:2212.09067)"
    needs = "clean labelled data"

    settings_cls = FTSettings
    settings: FTSettings

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        s = self.settings
        lr_at = Constant(s.lr) if s.schedule == "constant" else Cosine(s.lr, s.total_steps(len(ctx.tune)))
        fine_tune(ctx, s, lr_at)
        return {"settings": asdict(s)}
