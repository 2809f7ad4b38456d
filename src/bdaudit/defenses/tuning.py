"""Fine-tuning on the clean subset for the defenses that retrain (ft, sft, ftsam, fst, nad, fp, nc):
their recipe defaults and the adapter from a ``DefenseContext`` to the engine's one loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bdaudit.core.errors import BdauditError
from bdaudit.core.heads import unfreeze
from bdaudit.defenses.base import DefenseContext
from bdaudit.engine.loop import BatchTransform, Hooks, LossFunction, LrFunction, StepFunction, fit
from bdaudit.engine.recipe import Recipe, check_lr, steps_per_epoch
from bdaudit.engine.schedules import Constant, Cosine
from bdaudit.engine.stamping import chain


@dataclass(frozen=True)
class TuneSettings(Recipe):
    """The defenses' recipe: 20 epochs of batches of 64 with a floor of 100 steps."""

    epochs: int = 20
    min_steps: int = 100


@dataclass(frozen=True)
class RateSettings(TuneSettings):
    """A single learning rate, held constant or decayed by a cosine (FT, FP, FT-SAM, FST, NAD)."""

    lr: float = 0.01
    schedule: str = "constant"  # or cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self.lr)
        if self.schedule not in ("constant", "cosine"):
            raise BdauditError(f"`schedule` must be constant or cosine, not '{self.schedule}'")

    def lr_function(self, n_images: int) -> LrFunction:
        return Constant(self.lr) if self.schedule == "constant" else Cosine(self.lr, self.total_steps(n_images))


def fine_tune(ctx: DefenseContext, settings: Recipe, lr_at: LrFunction, *,
              loss_fn: LossFunction | None = None, step_fn: StepFunction | None = None,
              on_step: Callable[[], None] | None = None, stamp: BatchTransform | None = None) -> None:
    """Fine-tune ``ctx.classifier`` on the clean tuning data with the given per-step rate through
    ``engine.loop.fit``; ``stamp`` (a defense's own stamping, e.g. Neural Cleanse's reversed
    triggers) runs before ``ctx.unlearn`` (the scan's flagged triggers)."""
    params = ctx.trainable_parameters()
    steps = steps_per_epoch(len(ctx.tune), settings.batch_size)

    def on_epoch(epoch: int, loss: float) -> None:
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, lr_at((epoch + 1) * steps - 1), loss)

    transform = chain(stamp, ctx.unlearn)
    if ctx.unlearn is not None:  # run_defense reports it only for defenses that tuned with it
        ctx.extras["unlearning_applied"] = True
    hooks = Hooks(batch_transform=transform, on_epoch=on_epoch, on_step=on_step,
                  set_modes=ctx.set_train_modes, loss_fn=loss_fn, step_fn=step_fn)
    fit(ctx.classifier, ctx.tune, settings, lr_at, ctx.runtime(), hflip=ctx.config.hflip, params=params,
        hooks=hooks)
    unfreeze(ctx.net)
