"""The training recipe: optimizer, momentum, weight decay, batch size, epochs, a step floor and
augmentation — the knobs planting, fine-tuning defenses and re-injection share, checked once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.errors import BdauditError
from bdaudit.engine.schedules import Cosine

# Far beyond any useful run, yet small enough that a typo (epochs 10^20) is refused, not started.
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_STEPS = 1_000_000
MAX_LR = 10.0
OPTIMIZERS = ("sgd", "adam", "adamw")


def check_lr(value: float, field: str = "lr") -> None:
    """A learning rate must be in (0, MAX_LR]: beyond that every model diverges."""
    if not 0.0 < value <= MAX_LR:
        raise BdauditError(f"`{field}` must be in (0, {MAX_LR:g}], not {value}")


def check_optimizer(name: str, field: str = "optimizer") -> None:
    if name not in OPTIMIZERS:
        raise BdauditError(f"`{field}` must be {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}, not '{name}'")


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """One of ``OPTIMIZERS`` over ``params`` (momentum applies to SGD only)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise BdauditError(f"`optimizer` must be {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}, not '{name}'")


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, -(-n_images // batch_size))


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding and an optional horizontal flip (never for digits)."""

    pad: int = 2
    hflip: bool = False

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.pad > 0:
            n, _, h, w = x.shape
            padded = F.pad(x, (self.pad,) * 4)
            # One integer shift per image: translate by unfolding offsets with gather-free slicing.
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).tolist()
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).tolist()
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if self.hflip:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


@dataclass(frozen=True)
class Recipe:
    """What every training run shares. Subclasses change the defaults (planting trains longer with
    bigger batches; defenses add a step floor) and add their own rate knobs."""

    epochs: int = 20
    # A step floor: 20 epochs of 50 images is 20 steps, too few to move anything; small sets get
    # more epochs instead (epochs_for). 0 turns it off.
    min_steps: int = 0
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment_pad: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise BdauditError(f"`epochs` must be between 1 and {MAX_EPOCHS}, not {self.epochs}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise BdauditError(f"`batch_size` must be between 1 and {MAX_BATCH}, not {self.batch_size}")
        if self.min_steps > MAX_STEPS:
            raise BdauditError(f"`min_steps` must be at most {MAX_STEPS}, not {self.min_steps}")
        if self.min_steps < 0:
            raise BdauditError(f"`min_steps` must be >= 0, not {self.min_steps}")
        if not 0.0 <= self.momentum < 1.0:
            raise BdauditError(f"`momentum` must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise BdauditError(f"`weight_decay` must be >= 0, not {self.weight_decay}")
        check_optimizer(self.optimizer)

    def epochs_for(self, n_images: int) -> int:
        """``epochs``, raised until the run has at least ``min_steps`` steps on ``n_images``."""
        per_epoch = steps_per_epoch(n_images, self.batch_size)
        return max(self.epochs, -(-self.min_steps // per_epoch))

    def total_steps(self, n_images: int) -> int:
        return self.epochs_for(n_images) * steps_per_epoch(n_images, self.batch_size)

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_optimizer(params, self.optimizer, lr, self.momentum, self.weight_decay)

    def augment(self, hflip: bool) -> Augment:
        return Augment(self.augment_pad, hflip)


def warm_cosine(lr: float, total_steps: int) -> Cosine:
    """The planting schedule: cosine decay after a warm-up of a tenth of the run (at most 50 steps)."""
    return Cosine(lr, total_steps, warmup_steps=min(50, total_steps // 10))
