"""SIG trigger — Barni et al., "A new Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning" (2019, arXiv:1902.11237)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

NULL_SEED = 4242
CPU = torch.device("cpu")


@register_trigger
@dataclass(frozen=True)
class Sig(Trigger):
    """A horizontal sinusoid ``delta * sin(2 pi j frequency / W)`` added to every channel.

    delta: amplitude on the [0, 1] scale. The paper uses 20 on 0..255 (0.078); the default 0.1
    (about 25/255) sits between that and the 0.1-0.2 common in benchmark code. frequency: full
    periods across the width; it must stay below W / 2 (at W / 2 the samples are all zero).
    Null: the same per-pixel magnitude ``|v|`` with seeded random signs, so L1, L2 and L-inf
    norms match exactly but there is no sinusoid.
    """

    name = "sig"
    paper = "Barni et al. 2019, A new Backdoor Attack in CNNs ... (arXiv:1902.11237)"
    summary = "horizontal sinusoidal signal added to the whole image"

    delta: float = 0.1
    frequency: float = 6.0

    def __post_init__(self) -> None:
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], not {self.delta}")
        if self.frequency <= 0:
            raise ValueError(f"frequency must be > 0, not {self.frequency}")

    def _signal(self, height: int, width: int) -> torch.Tensor:
        if self.frequency >= width / 2:
            raise ValueError(f"a sinusoid of frequency {self.frequency} needs images wider than "
                             f"{2 * self.frequency:g} px; got {height}x{width}")
        # Built on the CPU in float64 so every device sees the same values.
        cols = torch.arange(width, dtype=torch.float64)
        row = self.delta * torch.sin(2 * math.pi * cols * self.frequency / width)
        return row.expand(height, width)

    def _add(self, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        return (x + signal.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self._signal(x.shape[-2], x.shape[-1]))

    def null(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        signs = (seeded_pattern(NULL_SEED, (height, width), CPU) < 0.5).double() * 2 - 1
        return self._add(x, self._signal(height, width).abs() * signs)
