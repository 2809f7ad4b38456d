"""WaNet (Nguyen & Tran 2021, arXiv:2102.10369): warping trigger with its "noise mode".

Besides the poisoned share, ``cross_ratio`` x as many other images get the trigger warp plus
random jitter and keep their labels, so the model learns the exact warp rather than "any warp".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdaudit.attacks.base import Attack, register_attack


@register_attack
@dataclass
class WaNetAttack(Attack):
    name = "wanet"
    paper = "Nguyen & Tran 2021, WaNet (arXiv:2102.10369)"
    trigger_family = "wanet"
    cross_ratio: float = 2.0

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().poison_batch(x, y, poisoned, gen)
        clean_rows = torch.nonzero(~poisoned).flatten()
        n_cross = min(len(clean_rows), round(self.cross_ratio * self.poison_rate * len(y)))
        if n_cross > 0:
            rows = clean_rows[torch.randperm(len(clean_rows), generator=gen)[:n_cross]]
            x = x.clone()
            x[rows] = self.trigger.noise_warp(x[rows], gen)  # type: ignore[attr-defined]
        return x, y
