"""BadNets patch trigger — Gu et al., "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain" (2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

POSITIONS = ("br", "bl", "tr", "tl", "center")


@register_trigger
@dataclass(frozen=True)
class BadNets(Trigger):
    """A small square stamped onto the image.

    size: side in pixels (0 = 10 % of the shorter side, at least 3).
    position: br, bl, tr, tl or center; margin: pixels from the border.
    pattern: ``checkerboard`` (black/white) or ``solid`` (``color`` in [0, 1] on every channel).
    """

    name = "badnets"
    paper = "Gu et al. 2017, BadNets (arXiv:1708.06733)"
    summary = "square patch (checkerboard or solid colour) stamped at a fixed position"

    size: int = 0
    position: str = "br"
    margin: int = 1
    pattern: str = "checkerboard"
    color: float = 1.0

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.pattern not in ("checkerboard", "solid"):
            raise ValueError(f"pattern must be checkerboard or solid, not {self.pattern!r}")
        if self.size < 0 or self.margin < 0:
            raise ValueError("size and margin must be >= 0")
        if not 0.0 <= self.color <= 1.0:
            raise ValueError("color must be in [0, 1]")

    def _box(self, height: int, width: int) -> tuple[int, int, int]:
        side = self.size or max(3, round(0.1 * min(height, width)))
        if side + self.margin > min(height, width):
            raise ValueError(f"a {side}px patch with margin {self.margin} does not fit "
                             f"{height}x{width} images")
        top = {"t": self.margin, "b": height - self.margin - side}
        left = {"l": self.margin, "r": width - self.margin - side}
        if self.position == "center":
            return (height - side) // 2, (width - side) // 2, side
        return top[self.position[0]], left[self.position[1]], side

    def _stamp(self, x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        top, left, side = self._box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., top:top + side, left:left + side] = patch
        return out

    def _patch(self, side: int, device: torch.device) -> torch.Tensor:
        if self.pattern == "solid":
            return torch.full((side, side), self.color, device=device)
        idx = torch.arange(side, device=device)
        return ((idx[:, None] + idx[None, :]) % 2).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _, _, side = self._box(x.shape[-2], x.shape[-1])
        return self._stamp(x, self._patch(side, x.device))

    def null(self, x: torch.Tensor) -> torch.Tensor:
        # Same box, seeded random pixels: the same occlusion without the pattern.
        _, _, side = self._box(x.shape[-2], x.shape[-1])
        noise = seeded_pattern(1234, (x.shape[1], side, side), x.device)
        return self._stamp(x, noise)
