"""Neural Cleanse (Wang et al. 2019, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks
in Neural Networks", IEEE S&P): reverse a trigger for every class on the clean data, flag the
classes whose reversed trigger is abnormally small (MAD anomaly index > 2, below the median), and
unlearn: fine-tune on the clean data where a fraction of every batch carries a flagged class's
reversed trigger but keeps its true label (the paper's "unlearning" mitigation, section VI-C).

When no class is flagged the model is left unchanged — Neural Cleanse's documented behaviour:
it found no backdoor to remove (the returned ``unlearned`` is False).

Known limit of the paper's rule, seen on bdaudit's MNIST test fixture: a class's index can never
exceed ``median / (1.4826 * MAD)`` (its norm cannot fall below 0), so when the clean classes'
norms spread widely — there from ~35 to ~240 pixels — even a near-zero reversed trigger (~3
pixels for the BadNets target) scores only 1.4-2.1 depending on seed and budget (1.36 at the
defaults: not flagged). The report's
``inversion.max_possible_index`` shows that ceiling. bdaudit therefore judges the norms by ratio
(``anomaly_scale=log``, the default), which flags that target (index 5-7) while the clean model's
classes stay <= 1.3; ``--set anomaly_scale=l1`` restores the paper's rule.

Knobs (``bdaudit clean --method nc``):

- inversion (``bdaudit.detect.inversion``): ``inversion_steps`` mini-batches per class,
  ``inversion_batch_size``, ``inversion_lr`` (Adam), ``init_cost`` (NC's initial lambda),
  ``success_threshold`` (the attack success the schedule holds, 0.99), ``anomaly_threshold`` (2),
  ``anomaly_scale`` (``log``, the default: the paper's rule on log norms, a bdaudit extension — see
  ``bdaudit.detect.inversion`` — or ``l1``, the paper's rule);
- unlearning: ``epochs``, ``batch_size``, ``lr`` (constant), ``optimizer``, ``momentum``,
  ``weight_decay``, ``augment_pad`` (as ``ft``), and ``poison_fraction`` — the fraction of each
  batch stamped with a reversed trigger (the paper: 20 %).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, register_defense
from bdaudit.defenses.tuning import TuneSettings
from bdaudit.detect.inversion import InversionResult, InversionSettings, InvertedTrigger, invert_triggers
from bdaudit.engine.loop import Augment, BatchTransform, make_optimizer, train
from bdaudit.engine.schedules import Constant


@dataclass(frozen=True)
class NCSettings(TuneSettings):
    epochs: int = 5
    lr: float = 0.01
    poison_fraction: float = 0.2
    inversion_steps: int = InversionSettings.steps
    inversion_batch_size: int = InversionSettings.batch_size
    inversion_lr: float = InversionSettings.lr
    init_cost: float = InversionSettings.init_cost
    success_threshold: float = InversionSettings.success_threshold
    anomaly_threshold: float = InversionSettings.anomaly_threshold
    anomaly_scale: str = InversionSettings.anomaly_scale

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.lr <= 10.0:
            raise BdauditError(f"--lr must be in (0, 10], not {self.lr}")
        if not 0.0 < self.poison_fraction <= 1.0:
            raise BdauditError(f"--poison-fraction must be in (0, 1], not {self.poison_fraction}")
        self.inversion()  # validates the inversion knobs under their flag names

    def inversion(self) -> InversionSettings:
        try:
            return InversionSettings(steps=self.inversion_steps, batch_size=self.inversion_batch_size,
                                     lr=self.inversion_lr, init_cost=self.init_cost,
                                     success_threshold=self.success_threshold,
                                     anomaly_threshold=self.anomaly_threshold, anomaly_scale=self.anomaly_scale)
        except BdauditError as exc:  # name the flag as this method spells it
            message = str(exc)
            for short, long in (("`steps` ", "`inversion_steps` "), ("`batch_size` ", "`inversion_batch_size` "),
                                ("`lr` ", "`inversion_lr` ")):
                message = message.replace(short, long)
            raise BdauditError(message) from None


def stamp_batches(triggers: list[InvertedTrigger], fraction: float) -> BatchTransform:
    """A ``train`` batch transform: ``fraction`` of the batch gets a random reversed trigger,
    labels unchanged (so the model learns that the trigger means nothing)."""

    def transform(x: torch.Tensor, y: torch.Tensor, _index: torch.Tensor,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = round(fraction * len(y))
        if count == 0:
            return x, y
        pick = torch.randperm(len(y), generator=gen)[:count]
        which = torch.randint(0, len(triggers), (count,), generator=gen)
        x = x.clone()
        for j, trigger in enumerate(triggers):
            rows = pick[which == j]
            if len(rows):
                x[rows] = trigger.apply(x[rows])
        return x, y

    return transform


@register_defense
class NeuralCleanse(Defense):
    name = "nc"
    paper = ("Wang et al. 2019, Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural "
             "Networks (IEEE S&P)")
    needs = "clean labelled data; no known trigger or target (a patch-like trigger is reversed per class)"

    settings_cls = NCSettings
    settings: NCSettings

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        if ctx.scope != "full":
            raise BdauditError("method nc unlearns with the whole network; use --scope full")
        s = self.settings
        result = invert_triggers(ctx.classifier, ctx.tune, settings=s.inversion(), device=ctx.device, gen=ctx.gen)
        out: dict[str, Any] = {"settings": asdict(s), "inversion": result.to_dict(), "flagged": list(result.flagged),
                               "unlearned": False}
        if not result.flagged:
            out["note"] = (f"no class's reversed trigger is an outlier ({s.anomaly_scale} anomaly index <= "
                           f"{s.anomaly_threshold:g} for every class below the median): Neural Cleanse "
                           "found no backdoor and left the model unchanged")
            return out
        unlearn(ctx, s, result)
        out["unlearned"] = True
        return out


def unlearn(ctx: DefenseContext, s: NCSettings, result: InversionResult) -> None:
    """Fine-tune on clean data with the flagged classes' reversed triggers stamped, true labels kept."""
    triggers = [result.trigger(c) for c in result.flagged]
    params = list(ctx.trainable_parameters())
    optimizer = make_optimizer(params, s.optimizer, s.lr, s.momentum, s.weight_decay)

    def on_epoch(epoch: int, loss: float) -> None:
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, s.lr, loss)

    train(ctx.classifier, ctx.tune, epochs=s.epochs, batch_size=s.batch_size, optimizer=optimizer,
          lr_at=Constant(s.lr), gen=ctx.gen, device=ctx.device,
          augment=Augment(s.augment_pad, ctx.config.hflip),
          batch_transform=stamp_batches(triggers, s.poison_fraction), on_epoch=on_epoch,
          set_modes=ctx.set_train_modes)
