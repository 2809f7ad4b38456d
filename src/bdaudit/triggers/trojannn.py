"""TrojanNN-style watermark trigger — Liu et al., "Trojaning Attack on Neural Networks"
(NDSS 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdaudit.triggers.badnets import POSITIONS
from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

NULL_SEED_OFFSET = 7919
CPU = torch.device("cpu")
GLYPH_GRID = 4  # coarse control grid: 4x4 gives a few irregular blobs, like a small logo


def square_origin(height: int, width: int, side: int, position: str,
                  margin: int) -> tuple[int, int]:
    """Top-left corner of a ``side`` square at a BadNets-style position; ValueError if it does
    not fit."""
    if side + margin > min(height, width):
        raise ValueError(f"a {side}px patch with margin {margin} does not fit "
                         f"{height}x{width} images")
    if position == "center":
        return (height - side) // 2, (width - side) // 2
    top = {"t": margin, "b": height - margin - side}[position[0]]
    left = {"l": margin, "r": width - margin - side}[position[1]]
    return top, left


def stamp(x: torch.Tensor, top: int, left: int, values: torch.Tensor, mask: torch.Tensor,
          alpha: float) -> torch.Tensor:
    """Blend ``values`` (C or 1, h, w) into ``x`` at (top, left) with weight ``alpha * mask``."""
    height, width = mask.shape[-2:]
    values = values.to(device=x.device, dtype=x.dtype)
    weight = alpha * mask.to(device=x.device, dtype=x.dtype)
    out = x.clone()
    region = out[..., top:top + height, left:left + width]
    out[..., top:top + height, left:left + width] = region * (1 - weight) + values * weight
    return out.clamp(0.0, 1.0)


def shuffle_pixels(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded spatial permutation of a (h, w) mask: same area and weights, no shape."""
    order = seeded_pattern(seed, (mask.numel(),), CPU).argsort()
    return mask.flatten()[order.to(mask.device)].view_as(mask)


def glyph(seed: int, side: int) -> torch.Tensor:
    """A seeded binary (side, side) blob mask covering about half of the square."""
    coarse = seeded_pattern(seed, (1, 1, GLYPH_GRID, GLYPH_GRID), CPU)
    fine = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    return (fine >= fine.median()).float()


@register_trigger
@dataclass(frozen=True)
class TrojanNN(Trigger):
    """A fixed white watermark glyph stamped at a corner or the centre.

    The real TrojanNN optimises its trigger against the victim model; this is the fixed
    watermark variant used by benchmarks. size: side of the glyph's square in pixels (0 = 20 %
    of the shorter side, at least 4). position: br, bl, tr, tl or center; margin: pixels from
    the border. alpha: opacity in (0, 1]. seed: seeds the glyph's shape.
    Null: the glyph's pixels scattered by a seeded permutation inside the same square, filled
    with seeded random values at the same alpha (same area and position, no glyph).
    """

    name = "trojannn"
    paper = "Liu et al. 2018, Trojaning Attack on Neural Networks (NDSS)"
    summary = "seeded logo-like watermark glyph stamped at a fixed position"

    size: int = 0
    position: str = "br"
    margin: int = 1
    alpha: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.size < 0 or self.margin < 0:
            raise ValueError("size and margin must be >= 0")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, not {self.seed}")

    def _box(self, height: int, width: int) -> tuple[int, int, int]:
        side = self.size or max(4, round(0.2 * min(height, width)))
        return (*square_origin(height, width, side, self.position, self.margin), side)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        top, left, side = self._box(x.shape[-2], x.shape[-1])
        mask = glyph(self.seed, side)
        return stamp(x, top, left, torch.ones(1, side, side), mask, self.alpha)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        top, left, side = self._box(x.shape[-2], x.shape[-1])
        null_seed = self.seed + NULL_SEED_OFFSET
        mask = shuffle_pixels(glyph(self.seed, side), null_seed)
        values = seeded_pattern(null_seed, (x.shape[1], side, side), CPU)
        return stamp(x, top, left, values, mask, self.alpha)
