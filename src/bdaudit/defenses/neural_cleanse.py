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
- unlearning: ``epochs``, ``min_steps``, ``batch_size``, ``lr`` (constant), ``optimizer``,
  ``momentum``, ``weight_decay``, ``augment_pad`` (as ``ft``, through the same tuning loop), and
  ``poison_fraction`` — the fraction of each batch stamped with a reversed trigger (the paper: 20 %).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.tuning import TuneSettings, fine_tune
from bdaudit.detect.inversion import InversionResult, InversionSettings, invert_triggers
from bdaudit.engine.recipe import check_lr
from bdaudit.engine.schedules import Constant
from bdaudit.engine.stamping import Stamping, check_share


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
        check_lr(self.lr)
        check_share(self.poison_fraction, "poison_fraction", allow_zero=False, allow_one=True)
        self.inversion()  # validates the inversion knobs under this method's field names

    def inversion(self) -> InversionSettings:
        try:
            return InversionSettings(steps=self.inversion_steps, batch_size=self.inversion_batch_size,
                                     lr=self.inversion_lr, init_cost=self.init_cost,
                                     success_threshold=self.success_threshold,
                                     anomaly_threshold=self.anomaly_threshold, anomaly_scale=self.anomaly_scale)
        except BdauditError as exc:  # name the field as this method spells it
            message = str(exc)
            for short, long in (("`steps` ", "`inversion_steps` "), ("`batch_size` ", "`inversion_batch_size` "),
                                ("`lr` ", "`inversion_lr` ")):
                message = message.replace(short, long)
            raise BdauditError(message) from None


@register_defense
class NeuralCleanse(Defense):
    name = "nc"
    revision = 1  # unlearning now honours min_steps (it was silently ignored)
    paper = ("Wang et al. 2019, Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural "
             "Networks (IEEE S&P)")
    needs = "clean labelled data; no known trigger or target (a patch-like trigger is reversed per class)"

    settings_cls = NCSettings
    settings: NCSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        ctx.require_full_scope(self.name, "unlearns with the whole network")
        s = self.settings
        result = invert_triggers(ctx.classifier, ctx.tune, settings=s.inversion(), device=ctx.device, gen=ctx.gen)
        out = DefenseResult(asdict(s), {"inversion": result.to_dict(), "flagged": list(result.flagged),
                                        "unlearned": False})
        if not result.flagged:
            out.note = (f"no class's reversed trigger is an outlier ({s.anomaly_scale} anomaly index <= "
                        f"{s.anomaly_threshold:g} for every class below the median): Neural Cleanse "
                        "found no backdoor and left the model unchanged")
            return out
        unlearn(ctx, s, result)
        out.details["unlearned"] = True
        return out


def unlearn(ctx: DefenseContext, s: NCSettings, result: InversionResult) -> None:
    """Fine-tune on clean data with the flagged classes' reversed triggers stamped, true labels kept,
    through the shared tuning loop (so ``min_steps`` and the scan's unlearning apply as for ``ft``)."""
    triggers = tuple(result.trigger(c) for c in result.flagged)
    fine_tune(ctx, s, Constant(s.lr), stamp=Stamping(triggers, s.poison_fraction, exact=True))
