"""Learning-rate schedules as pure functions of the step: easy to test, print and plot."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bdaudit.core.errors import BdauditError


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from ``lr`` to ``lr * final_fraction`` over ``total_steps``, after a linear
    warm-up of ``warmup_steps``."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    final_fraction: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.final_fraction
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TwoPhaseCyclic:
    """Super-fine-tuning's schedule (Sha et al. 2022, arXiv:2212.09067).

    Phase 1 (the first ``phase1_fraction`` of steps, rounded to whole cycles) cycles between
    ``lr_base`` and the high ``lr_peak1`` to push the weights out of the backdoor's basin;
    phase 2 cycles between ``lr_base`` and the low ``lr_peak2`` to recover clean accuracy.
    Within a cycle of ``cycle_steps`` the rate climbs linearly from base to peak over the first
    half and falls back over the second (triangular, as in Smith's super-convergence).
    """

    total_steps: int
    lr_base: float
    lr_peak1: float
    lr_peak2: float
    cycle_steps: int
    phase1_fraction: float = 0.4

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.cycle_steps < 2:
            raise BdauditError("the schedule needs at least 1 step and cycles of at least 2 steps")
        if not 0.0 < self.lr_base <= min(self.lr_peak1, self.lr_peak2):
            raise BdauditError(f"learning rates must satisfy 0 < base ({self.lr_base}) <= both "
                               f"peaks ({self.lr_peak1}, {self.lr_peak2})")
        if not 0.0 < self.phase1_fraction < 1.0:
            raise BdauditError(f"`phase1_fraction` must be in (0, 1), not {self.phase1_fraction}")

    @property
    def phase1_steps(self) -> int:
        raw = self.phase1_fraction * self.total_steps
        cycles = max(1, round(raw / self.cycle_steps))
        return min(self.total_steps, cycles * self.cycle_steps)

    def phase(self, step: int) -> int:
        return 1 if step < self.phase1_steps else 2

    def __call__(self, step: int) -> float:
        phase_start = 0 if self.phase(step) == 1 else self.phase1_steps
        peak = self.lr_peak1 if self.phase(step) == 1 else self.lr_peak2
        position = ((step - phase_start) % self.cycle_steps) / self.cycle_steps
        triangle = 1.0 - abs(2.0 * position - 1.0)
        return self.lr_base + (peak - self.lr_base) * triangle
