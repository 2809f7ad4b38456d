"""Shared fine-tuning machinery for defenses that retrain on the clean subset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import DefenseContext
from bdaudit.engine.loop import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_STEPS,
    Augment,
    LossFunction,
    LrFunction,
    StepFunction,
    make_optimizer,
    steps_per_epoch,
    train,
)
from bdaudit.engine.schedules import Constant, Cosine


@dataclass(frozen=True)
class TuneSettings:
    """Optimisation knobs shared by the fine-tuning defenses (SFT, FT, ...)."""

    epochs: int = 20
    # A step floor: 20 epochs of 50 images is 20 steps, too few to move anything; small clean
    # sets get more epochs instead (epochs_for). 0 turns it off.
    min_steps: int = 100
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment_pad: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise BdauditError(f"--epochs must be between 1 and {MAX_EPOCHS}, not {self.epochs}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise BdauditError(f"--batch-size must be between 1 and {MAX_BATCH}, not {self.batch_size}")
        if self.min_steps > MAX_STEPS:
            raise BdauditError(f"--min-steps must be at most {MAX_STEPS}, not {self.min_steps}")
        if self.min_steps < 0:
            raise BdauditError(f"--min-steps must be >= 0, not {self.min_steps}")
        if not 0.0 <= self.momentum < 1.0:
            raise BdauditError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise BdauditError(f"--weight-decay must be >= 0, not {self.weight_decay}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise BdauditError(f"--optimizer must be sgd, adam or adamw, not '{self.optimizer}'")

    def epochs_for(self, n_images: int) -> int:
        """``epochs``, raised until the run has at least ``min_steps`` steps on ``n_images``."""
        per_epoch = steps_per_epoch(n_images, self.batch_size)
        return max(self.epochs, -(-self.min_steps // per_epoch))

    def total_steps(self, n_images: int) -> int:
        return self.epochs_for(n_images) * steps_per_epoch(n_images, self.batch_size)


@dataclass(frozen=True)
class RateSettings(TuneSettings):
    """A single learning rate, held constant or decayed by a cosine (FT, FP, FT-SAM, FST, NAD)."""

    lr: float = 0.01
    schedule: str = "constant"  # or cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.lr <= 10.0:
            raise BdauditError(f"--lr must be in (0, 10], not {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise BdauditError(f"--schedule must be constant or cosine, not '{self.schedule}'")

    def lr_function(self, n_images: int) -> LrFunction:
        return Constant(self.lr) if self.schedule == "constant" else Cosine(self.lr, self.total_steps(n_images))


def fine_tune(ctx: DefenseContext, settings: TuneSettings, lr_at: LrFunction, *,
              loss_fn: LossFunction | None = None, step_fn: StepFunction | None = None,
              on_step: Callable[[], None] | None = None) -> None:
    """Fine-tune ``ctx.classifier`` on the clean tuning data with the given per-step rate;
    ``loss_fn``, ``step_fn`` and ``on_step`` pass through to ``train`` (defaults: plain CE)."""
    params = list(ctx.trainable_parameters())
    optimizer = make_optimizer(params, settings.optimizer, lr_at(0), settings.momentum,
                               settings.weight_decay)
    steps = steps_per_epoch(len(ctx.tune), settings.batch_size)

    def on_epoch(epoch: int, loss: float) -> None:
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, lr_at((epoch + 1) * steps - 1), loss)

    if ctx.unlearn is not None:  # run_defense reports it only for defenses that tuned with it
        ctx.extras["unlearning_applied"] = True
    train(ctx.classifier, ctx.tune, epochs=settings.epochs_for(len(ctx.tune)), batch_size=settings.batch_size,
          optimizer=optimizer, lr_at=lr_at, gen=ctx.gen, device=ctx.device, batch_transform=ctx.unlearn,
          augment=Augment(settings.augment_pad, ctx.config.hflip), on_epoch=on_epoch,
          set_modes=ctx.set_train_modes, loss_fn=loss_fn, step_fn=step_fn, on_step=on_step)
    for param in ctx.net.parameters():
        param.requires_grad_(True)
