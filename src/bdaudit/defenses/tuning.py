"""Shared fine-tuning machinery for defenses that retrain on the clean subset."""

from __future__ import annotations

from dataclasses import dataclass

from bdaudit.defenses.base import DefenseContext
from bdaudit.errors import BdauditError
from bdaudit.train import Augment, LrFunction, make_optimizer, steps_per_epoch, train


@dataclass(frozen=True)
class TuneSettings:
    """Optimisation knobs shared by the fine-tuning defenses (SFT, FT, ...)."""

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment_pad: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise BdauditError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise BdauditError(f"--batch-size must be at least 1, not {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise BdauditError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise BdauditError(f"--weight-decay must be >= 0, not {self.weight_decay}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise BdauditError(f"--optimizer must be sgd, adam or adamw, not '{self.optimizer}'")

    def total_steps(self, n_images: int) -> int:
        return self.epochs * steps_per_epoch(n_images, self.batch_size)


def fine_tune(ctx: DefenseContext, settings: TuneSettings, lr_at: LrFunction) -> None:
    """Fine-tune ``ctx.classifier`` on the clean tuning data with the given per-step rate."""
    params = list(ctx.trainable_parameters())
    optimizer = make_optimizer(params, settings.optimizer, lr_at(0), settings.momentum,
                               settings.weight_decay)
    steps = steps_per_epoch(len(ctx.tune), settings.batch_size)

    def on_epoch(epoch: int, loss: float) -> None:
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, lr_at((epoch + 1) * steps - 1), loss)

    train(ctx.classifier, ctx.tune, epochs=settings.epochs, batch_size=settings.batch_size,
          optimizer=optimizer, lr_at=lr_at, gen=ctx.gen, device=ctx.device,
          augment=Augment(settings.augment_pad, ctx.config.hflip), on_epoch=on_epoch,
          set_modes=ctx.set_train_modes)
    for param in ctx.net.parameters():
        param.requires_grad_(True)
