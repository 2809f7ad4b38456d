"""Probe a classifier with known triggers and measure attack success per target class."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.defaults import DEFAULT_FAIL_ASR, DEFAULT_FAMILY_ASR, DEFAULT_NULL_MARGIN
from bdaudit.core.errors import BdauditError
from bdaudit.core.predict import Predictor
from bdaudit.triggers import Trigger


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (sound at 0 and n, unlike Wald's)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Gates:
    """A trigger fails the gate when its ASR reaches ``fail_asr`` *and* beats the matched null
    perturbation by ``null_margin`` — so natural errors under that much change don't count — or
    when trigger and null *both* reach ``family_asr``: the model answers the whole trigger family
    (any blend, any warp of that strength) with one class, which natural errors do not."""

    fail_asr: float = DEFAULT_FAIL_ASR
    null_margin: float = DEFAULT_NULL_MARGIN
    family_asr: float | None = DEFAULT_FAMILY_ASR

    def __post_init__(self) -> None:
        if not 0.0 < self.fail_asr <= 1.0:
            raise BdauditError(f"--fail-asr must be in (0, 1], not {self.fail_asr}")
        if not 0.0 <= self.null_margin < 1.0:
            raise BdauditError(f"--null-margin must be in [0, 1), not {self.null_margin}")
        if self.family_asr is not None and not 0.0 < self.family_asr <= 1.0:
            raise BdauditError(f"--family-asr must be in (0, 1], not {self.family_asr}")

    def flag_reason(self, asr: float, null_asr: float) -> str | None:
        """``trigger`` (this pattern beats its null), ``family`` (the whole family works) or None."""
        if asr >= self.fail_asr and asr - null_asr >= self.null_margin:
            return "trigger"
        if self.family_asr is not None and min(asr, null_asr) >= max(self.family_asr, self.fail_asr):
            return "family"
        return None

    def flags(self, asr: float, null_asr: float) -> bool:
        return self.flag_reason(asr, null_asr) is not None

    def to_dict(self) -> dict[str, float | None]:
        return {"fail_asr": self.fail_asr, "null_margin": self.null_margin, "family_asr": self.family_asr}


@dataclass
class TriggerResult:
    trigger: str
    spec: str
    paper: str
    target: int | None
    target_name: str | None
    target_fixed: bool
    asr: float | None
    null_asr: float | None
    robust_accuracy: float | None
    asr_per_class: list[float] = field(default_factory=list)
    flagged: bool = False
    error: str | None = None
    flag_reason: str | None = None  # "trigger" or "family" (see Gates)
    n_probe: int | None = None  # held-out images not of the target: the ASR's denominator
    asr_ci95: list[float] | None = None  # Wilson 95 % interval of the ASR over those n_probe images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanResult:
    clean_accuracy: float
    n_images: int
    triggers: list[TriggerResult]

    @property
    def flagged(self) -> list[TriggerResult]:
        return [t for t in self.triggers if t.flagged]


def attack_success_rates(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ASR for every target t: the share of images not of class t predicted as t."""
    sent_to = torch.bincount(preds, minlength=num_classes).float()
    correct_in = torch.bincount(preds[preds == labels], minlength=num_classes).float()
    not_of = len(labels) - torch.bincount(labels, minlength=num_classes).float()
    return (sent_to - correct_in) / not_of.clamp(min=1)


def _predict_all(classifier: nn.Module, data: ImageSet, transforms: Sequence[Callable],
                 batch_size: int | None, device: torch.device, advance: Callable[[int], None] | None,
                 ) -> list[torch.Tensor]:
    """Predictions under each transform (``core.predict``: an evaluation copy, one copy back)."""
    return Predictor(classifier, device, batch_size).labels(data.images, transforms, advance)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def trigger_fit_error(trigger: Trigger, data: ImageSet) -> str | None:
    """Try the trigger (and its null) on one image: why it does not fit these inputs, or None."""
    try:
        trigger.apply(to_float(data.images[:1]))
        trigger.null(to_float(data.images[:1]))
    except (ValueError, RuntimeError) as exc:
        return f"trigger {trigger.spec()} does not fit {tuple(data.images.shape[1:])} images: {exc}"
    return None


def evaluate_triggers(classifier: nn.Module, data: ImageSet, triggers: Sequence[Trigger], *,
                      device: torch.device, batch_size: int = 256, target: int | None = None,
                      gates: Gates | None = None, advance: Callable[[int], None] | None = None,
                      targets: Sequence[int | None] | None = None, with_null: bool = True) -> ScanResult:
    """Clean accuracy plus, per trigger, ASR at the suspected (or given) target, the matched
    null rate and robust accuracy. ``targets`` fixes a target per trigger (e.g. the ones found
    before cleaning); otherwise ``target`` applies to all, and None searches."""
    gates = gates or Gates()
    per_trigger = list(targets) if targets is not None else [target] * len(triggers)
    for fixed in per_trigger:
        if fixed is not None and not 0 <= fixed < data.num_classes:
            raise BdauditError(f"--target {fixed} is not a class index (0..{data.num_classes - 1})")
    usable = [t for t in triggers if trigger_fit_error(t, data) is None]
    transforms: list[Callable] = [_identity]
    for trig in usable:  # without nulls (e.g. per-epoch history) the null slot repeats the trigger
        transforms += [trig.apply, trig.null] if with_null else [trig.apply]
    # (with_null=False also leaves flagged False: a gate needs the null rate)
    preds = _predict_all(classifier, data, transforms, batch_size, device, advance)
    labels = data.labels
    clean_acc = float((preds[0] == labels).float().mean())
    results = []
    by_name = {id(t): i for i, t in enumerate(usable)}
    for trig, target in zip(triggers, per_trigger, strict=True):
        if id(trig) not in by_name:
            results.append(TriggerResult(trig.name, trig.spec(), trig.paper, target, None,
                                         target is not None, None, None, None,
                                         error=trigger_fit_error(trig, data)))
            continue
        slot = 1 + (2 if with_null else 1) * by_name[id(trig)]
        asr_all = attack_success_rates(preds[slot], labels, data.num_classes)
        t = int(asr_all.argmax()) if target is None else target
        asr = float(asr_all[t])
        null = float(attack_success_rates(preds[slot + 1], labels, data.num_classes)[t]) if with_null else None
        n_probe = int((labels != t).sum())
        results.append(TriggerResult(
            trigger=trig.name, spec=trig.spec(), paper=trig.paper, target=t,
            target_name=data.class_names[t], target_fixed=target is not None, asr=asr,
            null_asr=null, robust_accuracy=float((preds[slot] == labels).float().mean()),
            asr_per_class=[round(float(v), 6) for v in asr_all],
            flagged=null is not None and gates.flags(asr, null),
            flag_reason=gates.flag_reason(asr, null) if null is not None else None,
            n_probe=n_probe, asr_ci95=[round(v, 4) for v in wilson_interval(round(asr * n_probe), n_probe)]))
    return ScanResult(clean_accuracy=clean_acc, n_images=len(data), triggers=results)
