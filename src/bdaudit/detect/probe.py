"""Probe a classifier with known triggers and measure attack success per target class."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
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


def paired_difference_interval(before: torch.Tensor, after: torch.Tensor,
                               z: float = 1.959964) -> tuple[float, float]:
    """95 % interval for mean(before) - mean(after) of two boolean outcomes on the same items
    (Newcombe 1998, method 10: Wilson bounds of each rate, corrected for their pairing), e.g. the
    accuracy a model loses when the same images are scored before and after cleaning."""
    n = len(before)
    if n == 0:
        return (-1.0, 1.0)
    both = int((before & after).sum())
    lost = int((before & ~after).sum())
    gained = int((~before & after).sum())
    neither = n - both - lost - gained
    p1, p2 = (both + lost) / n, (both + gained) / n
    l1, u1 = wilson_interval(both + lost, n, z)
    l2, u2 = wilson_interval(both + gained, n, z)
    spread = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = (both * neither - lost * gained) / math.sqrt(spread) if spread else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above))


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
            raise BdauditError(f"`fail_asr` must be in (0, 1], not {self.fail_asr}")
        if not 0.0 <= self.null_margin < 1.0:
            raise BdauditError(f"`null_margin` must be in [0, 1), not {self.null_margin}")
        if self.family_asr is not None and not 0.0 < self.family_asr <= 1.0:
            raise BdauditError(f"`family_asr` must be in (0, 1], not {self.family_asr}")

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
    # Sequential probing (1.4): True when the verdict was certain at ``probe_confidence`` before
    # every held-out image was used, False when it took them all, None when probed in full.
    probe_decided: bool | None = None
    probe_confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanResult:
    clean_accuracy: float
    n_images: int
    triggers: list[TriggerResult]
    forward_passes: int = 0  # images through the model, one per image and transform (not reported)
    # Whether each image (in the data's order) was classified correctly: pairs two scans of one set.
    clean_correct: torch.Tensor | None = field(default=None, repr=False)

    @property
    def flagged(self) -> list[TriggerResult]:
        return [t for t in self.triggers if t.flagged]


def attack_success_rates(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ASR for every target t: the share of images not of class t predicted as t."""
    sent_to = torch.bincount(preds, minlength=num_classes).float()
    correct_in = torch.bincount(preds[preds == labels], minlength=num_classes).float()
    not_of = len(labels) - torch.bincount(labels, minlength=num_classes).float()
    return (sent_to - correct_in) / not_of.clamp(min=1)


def trigger_fit_error(trigger: Trigger, data: ImageSet) -> str | None:
    """Try the trigger (and its null) on one image: why it does not fit these inputs, or None."""
    try:
        trigger.apply(to_float(data.images[:1]))
        trigger.null(to_float(data.images[:1]))
    except (ValueError, RuntimeError) as exc:
        return f"trigger {trigger.spec()} does not fit {tuple(data.images.shape[1:])} images: {exc}"
    return None


PROBE_MODES = ("sequential", "full")


@dataclass(frozen=True)
class ProbeSettings:
    """How to probe. ``sequential`` (the default) probes each trigger on a seeded random order of
    the held-out images in growing chunks (``first_look``, then doubling) and stops once its
    verdict (flagged or not, and why) holds at ``confidence`` whatever the unseen images say;
    ``full`` probes every image with every trigger. Clean accuracy always uses every image.
    ``targets`` fixes a target per trigger (e.g. those found before cleaning); otherwise ``target``
    applies to all, and None searches. ``batch_size`` None: measured per model and device."""

    gates: Gates = field(default_factory=Gates)
    target: int | None = None
    targets: Sequence[int | None] | None = None
    batch_size: int | None = None
    with_null: bool = True  # without nulls (e.g. per-epoch history) nothing is gated or flagged
    probe: str = "sequential"
    confidence: float = 0.99
    first_look: int = 64
    seed: int = 0  # the order images are probed in (a generator of its own: no global randomness)

    def __post_init__(self) -> None:
        if self.probe not in PROBE_MODES:
            raise BdauditError(f"`probe` must be one of {', '.join(PROBE_MODES)}, not {self.probe!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise BdauditError(f"`confidence` must be in [0.5, 1), not {self.confidence}")
        if self.first_look < 1:
            raise BdauditError(f"`first_look` must be at least 1, not {self.first_look}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BdauditError(f"`batch_size` must be at least 1, not {self.batch_size}")


def look_schedule(n: int, first: int) -> list[int]:
    """Image counts at which a sequential probe looks: ``first``, doubling, then ``n``."""
    looks, k = [], first
    while k < n:
        looks.append(k)
        k *= 2
    return [*looks, n] if n > 0 else []


def _wilson_bounds(hits: torch.Tensor, n: torch.Tensor, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = n.double().clamp(min=1)
    p = hits.double() / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half).clamp(min=0), (centre + half).clamp(max=1)


def _successes(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target class: images not of it sent to it, and images not of it."""
    hits = torch.bincount(preds[preds != labels], minlength=num_classes)
    return hits, len(labels) - torch.bincount(labels, minlength=num_classes)


def _settled(gates: Gates, a: tuple[torch.Tensor, torch.Tensor], nul: tuple[torch.Tensor, torch.Tensor],
             fixed: int | None) -> bool:
    """Whether the gate's answer (flag reason or none) is the same for every ASR and null rate
    inside their bounds, at every class that can still turn out to be the target."""
    (a_lo, a_hi), (n_lo, n_hi) = a, nul
    # A class can still be the argmax while its upper bound reaches the best lower bound.
    classes = [fixed] if fixed is not None else [int(c) for c in torch.nonzero(a_hi >= a_lo.max()).flatten()]
    answers = set()
    for c in classes:
        trig_yes = a_lo[c] >= gates.fail_asr and a_lo[c] - n_hi[c] >= gates.null_margin
        trig_no = a_hi[c] < gates.fail_asr or a_hi[c] - n_lo[c] < gates.null_margin
        if gates.family_asr is None:
            fam_yes, fam_no = False, True
        else:
            bar = max(gates.family_asr, gates.fail_asr)
            fam_yes, fam_no = min(a_lo[c], n_lo[c]) >= bar, min(a_hi[c], n_hi[c]) < bar
        if trig_yes:
            answers.add("trigger")
        elif trig_no and fam_yes:
            answers.add("family")
        elif trig_no and fam_no:
            answers.add(None)
        else:
            return False
    return len(answers) == 1


def evaluate_triggers(classifier: nn.Module, data: ImageSet, triggers: Sequence[Trigger],
                      options: ProbeSettings | None = None, *, device: torch.device,
                      advance: Callable[[int], None] | None = None) -> ScanResult:
    """Clean accuracy plus, per trigger, ASR at the suspected (or given) target with its
    interval, the matched null rate and robust accuracy (``ProbeSettings``: sequential or full)."""
    options = options or ProbeSettings()
    gates = options.gates
    per_trigger = list(options.targets) if options.targets is not None else [options.target] * len(triggers)
    for fixed in per_trigger:
        if fixed is not None and not 0 <= fixed < data.num_classes:
            raise BdauditError(f"`target` {fixed} is not a class index (0..{data.num_classes - 1})")
    fit = {id(t): trigger_fit_error(t, data) for t in triggers}
    work = [(i, trig, fixed) for i, (trig, fixed) in enumerate(zip(triggers, per_trigger, strict=True))
            if fit[id(trig)] is None]
    sequential = options.probe == "sequential" and options.with_null
    n_all = len(data)
    order = (torch.randperm(n_all, generator=torch.Generator().manual_seed(options.seed)) if sequential
             else torch.arange(n_all))
    looks = look_schedule(n_all, options.first_look) if sequential else [n_all]
    labels = data.labels[order]
    predictor = Predictor(classifier, device, options.batch_size)
    # Bonferroni over the looks and the rates bounded at each (ASR and null, per candidate class):
    # every bound holds at once with probability >= confidence, so a settled verdict is that sure.
    n_rates = 2 * (1 if all(f is not None for _, _, f in work) else data.num_classes)
    z = NormalDist().inv_cdf(1 - (1 - options.confidence) / (2 * max(1, len(looks) * n_rates)))
    clean_chunks: list[torch.Tensor] = []
    chunks: dict[int, list[list[torch.Tensor]]] = {i: [[], []] for i, _, _ in work}
    used = {i: n_all for i, _, _ in work}
    active = list(work)
    seen = 0
    for look in looks:
        batch = data.images[order[seen:look]]
        transforms: list[Callable | None] = [None]
        for _, trig, _ in active:
            transforms += [trig.apply, trig.null] if options.with_null else [trig.apply]
        preds = predictor.labels(batch, transforms, advance)
        clean_chunks.append(preds[0])
        width = 2 if options.with_null else 1
        for k, (i, _, _) in enumerate(active):
            for j in range(width):
                chunks[i][j].append(preds[1 + width * k + j])
        seen = look
        if not sequential or look == n_all:
            continue
        still = []
        for i, trig, fixed in active:
            hits, n = _successes(torch.cat(chunks[i][0]), labels[:look], data.num_classes)
            null_hits, _ = _successes(torch.cat(chunks[i][1]), labels[:look], data.num_classes)
            if _settled(gates, _wilson_bounds(hits, n, z), _wilson_bounds(null_hits, n, z), fixed):
                used[i] = look
            else:
                still.append((i, trig, fixed))
        active = still
        if not active:  # every verdict settled: only clean accuracy still needs the other images
            clean_chunks.append(predictor.labels(data.images[order[look:]], [None], advance)[0])
            break
    correct = torch.empty(n_all, dtype=torch.bool)
    correct[order] = torch.cat(clean_chunks) == labels  # back to the data's order
    clean_acc = float(correct.float().mean())
    results = [_trigger_result(trig, fixed, fit[id(trig)], data) for trig, fixed in zip(triggers, per_trigger,
                                                                                       strict=True)]
    for i, trig, fixed in work:
        n = used[i]
        preds_a = torch.cat(chunks[i][0])
        preds_n = torch.cat(chunks[i][1]) if options.with_null else None
        results[i] = _measured(trig, fixed, data, labels[:n], preds_a, preds_n, gates)
        if sequential:
            results[i].probe_decided = n < n_all
            results[i].probe_confidence = options.confidence
    return ScanResult(clean_accuracy=clean_acc, n_images=n_all, triggers=results, clean_correct=correct,
                      forward_passes=predictor.forwards)


def _trigger_result(trig: Trigger, target: int | None, error: str | None, data: ImageSet) -> TriggerResult:
    return TriggerResult(trig.name, trig.spec(), trig.paper, target, None, target is not None, None, None, None,
                         error=error)


def _measured(trig: Trigger, target: int | None, data: ImageSet, labels: torch.Tensor, preds: torch.Tensor,
              null_preds: torch.Tensor | None, gates: Gates) -> TriggerResult:
    asr_all = attack_success_rates(preds, labels, data.num_classes)
    t = int(asr_all.argmax()) if target is None else target
    asr = float(asr_all[t])
    null = None if null_preds is None else float(attack_success_rates(null_preds, labels, data.num_classes)[t])
    n_probe = int((labels != t).sum())
    return TriggerResult(
        trigger=trig.name, spec=trig.spec(), paper=trig.paper, target=t,
        target_name=data.class_names[t], target_fixed=target is not None, asr=asr,
        null_asr=null, robust_accuracy=float((preds == labels).float().mean()),
        asr_per_class=[round(float(v), 6) for v in asr_all],
        flagged=null is not None and gates.flags(asr, null),
        flag_reason=gates.flag_reason(asr, null) if null is not None else None,
        n_probe=n_probe, asr_ci95=[round(v, 4) for v in wilson_interval(round(asr * n_probe), n_probe)])
