"""The attack interface and registry (BackdoorBox-style: one file per attack, same verbs).

An attack decides which training images to poison and how (``poison_batch``); planting code
(``bdaudit.planting.plant``) owns the training loop. Attacks that need their own loop (Input-aware)
override ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bdaudit.core.data import ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.engine.loop import BatchTransform
from bdaudit.engine.stamping import relabel, stamp_rows
from bdaudit.triggers import Trigger, create_trigger

ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


@dataclass
class Attack:
    """Dirty-label data poisoning: a fixed, seeded ``poison_rate`` share of the training set is
    drawn from non-target images, stamped with the trigger and relabelled to ``target``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    trigger_family: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    # Attacks that must train jointly with the model (Input-aware) set this and override fit().
    custom_training: ClassVar[bool] = False

    trigger: Trigger
    target: int
    poison_rate: float

    @classmethod
    def create(cls, target: int, poison_rate: float, **trigger_params: Any) -> Attack:
        return cls(create_trigger(cls.trigger_family, **trigger_params), target, poison_rate)

    def candidates(self, data: ImageSet) -> torch.Tensor:
        """Indices that may be poisoned: target-class images for clean-label attacks, the rest
        otherwise."""
        mask = data.labels == self.target if self.clean_label else data.labels != self.target
        return torch.nonzero(mask).flatten()

    def poison_count(self, data: ImageSet) -> int:
        base = (data.labels == self.target).sum() if self.clean_label else len(data)
        return round(self.poison_rate * int(base))

    def select(self, data: ImageSet, gen: torch.Generator) -> torch.Tensor:
        """A boolean mask over the dataset of the images to poison (fixed for the whole run)."""
        pool = self.candidates(data)
        count = self.poison_count(data)
        if count < 1 or count > len(pool):
            raise BdauditError(
                f"poison rate {self.poison_rate} asks for {count} poisoned images but "
                f"{len(pool)} {'target-class' if self.clean_label else 'non-target'} images are "
                "available; use more data or another `poison_rate`")
        mask = torch.zeros(len(data), dtype=torch.bool)
        mask[pool[torch.randperm(len(pool), generator=gen)[:count]]] = True
        return mask

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the trigger to the batch's poisoned rows (and relabel unless clean-label)."""
        if poisoned.any():
            x = stamp_rows(x, [(poisoned, self.trigger)])
            if not self.clean_label:
                y = relabel(y, poisoned, self.target)
        return x, y

    def stamping(self, poisoned: torch.Tensor) -> BatchTransform:
        """The loop's stamping hook for a dataset whose images ``poisoned`` (a mask over it) marks."""

        def transform(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return self.poison_batch(x, y, poisoned[index], gen)

        return transform

    def fit(self, classifier: torch.nn.Module, data: ImageSet, settings: Any,
            gen: torch.Generator, device: torch.device,
            on_epoch: Callable[[int, float], None] | None = None) -> None:
        """Train ``classifier`` (images in [0, 1]) with the attack's own loop; only for
        ``custom_training`` attacks. ``settings`` is a ``plant.TrainSettings``."""
        raise NotImplementedError(f"{self.name} uses the shared poisoning loop")

    def aux_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to ship inside the checkpoint so ``scan`` can rebuild the trigger."""
        return {}

    def probe_trigger(self) -> Trigger:
        """The trigger ``scan`` should probe to find this backdoor."""
        return self.trigger

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "paper": self.paper, "trigger": self.trigger.spec(),
                "trigger_params": self.trigger.params(), "target": self.target,
                "poison_rate": self.poison_rate, "clean_label": self.clean_label}
