"""Stamping part of a batch with a trigger — the one concept behind poisoning (attacks, re-injection),
trigger unlearning (the scan's flagged triggers) and Neural Cleanse's unlearning (reversed triggers).

A stamping is a ``loop.BatchTransform``: ``(x, y, dataset indices, generator) -> (x, y)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from bdaudit.core.errors import BdauditError
from bdaudit.engine.loop import BatchTransform

# Fresh family members come from seeds above this, away from the library's own (0) and null seeds.
VARIANT_SEED_BASE = 1 << 20


class Stamp(Protocol):
    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


def stamp_rows(x: torch.Tensor, groups: Iterable[tuple[torch.Tensor, Stamp]]) -> torch.Tensor:
    """``x`` with each group's rows (a mask or indices) stamped by its trigger; ``x`` itself is
    never written (a copy is made on the first stamped row)."""
    out = x
    for rows, stamp in groups:
        if rows.numel() == 0 or (rows.dtype == torch.bool and not rows.any()):
            continue
        if out is x:
            out = x.clone()
        out[rows] = stamp.apply(out[rows]).to(x.dtype)
    return out


def relabel(y: torch.Tensor, rows: torch.Tensor, target: int) -> torch.Tensor:
    """Dirty-label poisoning: the stamped rows (a mask) now claim ``target``."""
    return torch.where(rows, torch.full_like(y, target), y)


def check_share(value: float, field: str, *, allow_zero: bool, allow_one: bool) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    high_ok = value <= 1.0 if allow_one else value < 1.0
    if not (low_ok and high_ok):
        raise BdauditError(f"`{field}` must be in {'[' if allow_zero else '('}0, 1{']' if allow_one else ')'}, "
                           f"not {value}")


@dataclass(frozen=True)
class Stamping:
    """Stamps a share of every batch with one of ``triggers`` and keeps the labels, so the model
    learns that the trigger means nothing.

    ``exact``: exactly ``round(fraction * batch)`` rows (Neural Cleanse's unlearning); otherwise
    each row with probability ``fraction``, and a stamped row gets, with probability ``family``,
    a fresh member of its trigger's family (``trigger.variant(seed)``) instead of the trigger.
    """

    triggers: tuple[Stamp, ...]
    fraction: float
    family: float = 0.0
    exact: bool = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.exact:
            return self._exact(x, gen), y
        if not self.triggers or self.fraction == 0.0:
            return x, y
        chosen = torch.rand(len(x), generator=gen) < self.fraction
        which = torch.randint(0, len(self.triggers), (len(x),), generator=gen)
        fresh = torch.rand(len(x), generator=gen) < self.family
        seeds = torch.randint(VARIANT_SEED_BASE, 1 << 30, (len(self.triggers),), generator=gen).tolist()
        groups = []
        for slot, trigger in enumerate(self.triggers):
            for use_variant in (False, True):
                rows = chosen & (which == slot) & (fresh == use_variant)
                if rows.any():
                    groups.append((rows, trigger.variant(seeds[slot]) if use_variant else trigger))  # type: ignore[attr-defined]
        return stamp_rows(x, groups), y

    def _exact(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        count = round(self.fraction * len(x))
        if count == 0:
            return x
        pick = torch.randperm(len(x), generator=gen)[:count]
        which = torch.randint(0, len(self.triggers), (count,), generator=gen)
        return stamp_rows(x, ((pick[which == j], trigger) for j, trigger in enumerate(self.triggers)))


def chain(*transforms: BatchTransform | None) -> BatchTransform | None:
    """The given stampings applied in order (None entries skipped; None when none is left)."""
    chosen: Sequence[BatchTransform] = [t for t in transforms if t is not None]
    if len(chosen) <= 1:
        return chosen[0] if chosen else None

    def transform(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        for step in chosen:
            x, y = step(x, y, index, gen)
        return x, y

    return transform
