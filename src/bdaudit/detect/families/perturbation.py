"""``perturbation``: a universal additive perturbation ``x' = clip(x + delta)`` per class, with
Neural Cleanse's adaptive-cost search on its L2 norm — the smallest *whole-image* change that sends
clean images to a class. A blend ``(1 - a) x + a p`` is ``x + a (p - x)``: nearly universal for
small ``a``; a frequency pattern is an additive change outright. (BTI-DBF, UNICORN and FeatureRE
reach the same conclusion — invert in a space that is not a pixel mask — with generators and
feature spaces; a universal perturbation is the cheapest member of that family and what a CPU
affords.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from bdaudit.detect.families.base import FamilyJob, InvertingFamily
from bdaudit.detect.inversion import InversionSettings, _adaptive_search, _Search
from bdaudit.triggers.base import Trigger

if TYPE_CHECKING:
    from bdaudit.detect.unknown import DetectSettings


@dataclass(frozen=True, eq=False)
class PerturbationTrigger(Trigger):
    """A reversed whole-image trigger: ``clip(x + delta)``; ``null`` adds seeded noise of the same
    L2 norm (the same amount of change, no direction)."""

    name = "inverted_perturbation"
    paper = "bdaudit unknown-trigger detector (universal perturbation inversion)"
    summary = "whole-image perturbation reversed by bdaudit's detector"
    in_default_library = False

    delta: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, 1))  # (C, H, W)
    target_class: int = -1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        noise = torch.randn(tuple(self.delta.shape), generator=gen)
        noise = noise * (self.delta.norm() / noise.norm().clamp_min(1e-12))
        return (x + noise.to(x.device, x.dtype)).clamp(0, 1)

    def spec(self) -> str:
        return f"{self.name}:target={self.target_class},l2={float(self.delta.norm()):.2f}"


def invert_perturbation(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[int],
                        nc: InversionSettings, lr: float, device: torch.device, gen: torch.Generator,
                        ) -> tuple[torch.Tensor, list[float]]:
    """Smallest-L2 universal additive perturbation per target (NC's adaptive cost on the norm)."""
    k = len(targets)
    _, c, h, w = images.shape
    delta = (0.01 * torch.randn(k, c, h, w, generator=gen)).to(device).requires_grad_(True)

    def stamp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        # ``delta`` itself is kept: read after the optimiser's step, as this family always has.
        return (x[None] + delta[:, None]).clamp(0, 1), delta.flatten(1).norm(dim=1), (delta,)

    def current() -> tuple[torch.Tensor, ...]:
        return (delta.detach().cpu(),)

    optimizer = torch.optim.Adam([delta], lr=lr, betas=(0.5, 0.9))
    (best,), costs = _adaptive_search(classifier, images, labels, targets, nc, device, gen,
                                      _Search(optimizer, stamp, current))
    return best, costs


class PerturbationFamily(InvertingFamily):
    name: ClassVar[str] = "perturbation"
    size_unit: ClassVar[str] = "L2 norm"

    def threshold(self, settings: DetectSettings) -> float:
        return settings.perturbation_threshold

    def invert(self, job: FamilyJob) -> tuple[list[float], dict[int, Trigger]]:
        nc = InversionSettings(steps=job.steps, batch_size=job.settings.batch_size, init_cost=1e-2, patience=2,
                               check_every=5)
        deltas, _ = invert_perturbation(job.classifier, job.images.images, job.images.labels, job.classes, nc,
                                        job.settings.perturbation_lr, job.device, job.gen)
        triggers: dict[int, Trigger] = {c: PerturbationTrigger(delta=deltas[i].clone(), target_class=c)
                                        for i, c in enumerate(job.classes)}
        return deltas.flatten(1).norm(dim=1).tolist(), triggers
