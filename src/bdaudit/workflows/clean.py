"""``bdaudit clean``: remove a backdoor with a defense (FT-SAM plus trigger unlearning by default)
and prove both sides — the backdoor's ASR fell and the clean accuracy held."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdaudit import __version__
from bdaudit.core.data import DataSplit, ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.core.heads import head_of
from bdaudit.defenses import SCOPES, Defense, DefenseContext
from bdaudit.defenses.unlearning import UNLEARN_FAMILY_SHARE, plan_unlearning
from bdaudit.detect.probe import Gates, ProbeSettings, ScanResult, evaluate_triggers, paired_difference_interval
from bdaudit.models.checkpoint import LoadedModel, save_model
from bdaudit.triggers import Trigger
from bdaudit.workflows.scan import scan_section

MIN_IMAGES_PER_CLASS = 5  # below this the tuning set cannot represent a class


@dataclass(frozen=True)
class CleanGates:
    """Gates for a cleaned model: residual ASR (see ``scan.Gates``) and accuracy cost."""

    scan: Gates = Gates()
    max_accuracy_drop: float | None = 0.02

    def to_dict(self) -> dict[str, float | None]:
        return {**self.scan.to_dict(), "max_accuracy_drop": self.max_accuracy_drop}


@dataclass
class CleanOutcome:
    before: ScanResult
    after: ScanResult
    history: list[dict[str, Any]]
    used: dict[str, Any]
    seconds: float
    classifier: torch.nn.Module


def check_tuning_data(tune: ImageSet, loaded: LoadedModel) -> None:
    counts = tune.counts()
    missing = [name for name, n in counts.items() if n == 0
               and name in (loaded.config.class_names or counts)]
    if missing:
        raise BdauditError(f"the clean data has no tuning images of class(es) {', '.join(missing[:8])}; "
                           "every class the model predicts must be represented")
    thin = [f"{name} ({n})" for name, n in counts.items() if 0 < n < MIN_IMAGES_PER_CLASS]
    if thin:
        raise BdauditError(f"too few clean tuning images for class(es) {', '.join(thin[:8])}: need at "
                           f"least {MIN_IMAGES_PER_CLASS} per class ({MIN_IMAGES_PER_CLASS * len(counts)} "
                           "in all); add images or lower `holdout`")


HISTORY_MODES = ("sparse", "full", "off")


@dataclass(frozen=True)
class DefenseRun:
    """How ``run_defense`` cleans and what it measures. ``history``: ``sparse`` (default) probes
    clean accuracy and the flagged triggers on ``history_images`` fixed held-out images every
    ``history_every`` epochs and at the end; ``full`` probes every usable trigger on every
    held-out image after every epoch (for research); ``off`` records none. ``probe`` is how the
    before and after scans probe (``detect.probe.ProbeSettings``)."""

    scope: str = "full"
    gates: CleanGates = field(default_factory=CleanGates)
    target: int | None = None
    batch_size: int | None = 256
    unlearn_fraction: float = 0.0
    unlearn_family: float = UNLEARN_FAMILY_SHARE
    unlearn_only: Sequence[Trigger] | None = None  # unlearn only these (the rest are only measured)
    history: str = "sparse"
    history_every: int = 5
    history_images: int = 200
    probe: str = "sequential"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise BdauditError(f"`scope` must be one of {', '.join(SCOPES)}, not '{self.scope}'")
        if self.history not in HISTORY_MODES:
            raise BdauditError(f"`history` must be one of {', '.join(HISTORY_MODES)}, not '{self.history}'")
        if self.history_every < 1:
            raise BdauditError(f"`history_every` must be at least 1, not {self.history_every}")
        if self.history_images < 1:
            raise BdauditError(f"`history_images` must be at least 1, not {self.history_images}")

    def probe_options(self, **fields: Any) -> ProbeSettings:
        return ProbeSettings(self.gates.scan, batch_size=self.batch_size, probe=self.probe, **fields)


def history_subset(heldout: ImageSet, n: int) -> ImageSet:
    """The fixed held-out images the sparse history probes: a seeded choice of its own (no
    training randomness), the same every epoch."""
    if n >= len(heldout):
        return heldout
    pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return heldout.subset(pick)


def run_defense(defense: Defense, loaded: LoadedModel, split: DataSplit, triggers: Sequence[Trigger],
                options: DefenseRun | None = None, *, device: torch.device, gen: torch.Generator,
                on_epoch: Callable[[dict[str, Any]], None] | None = None) -> CleanOutcome:
    """Scan, clean a copy of the model, then scan the cleaned model again from scratch at the
    targets found before (nothing from the history is reused). With ``unlearn_fraction``, tuning
    defenses also unlearn the triggers the first scan flagged (``defenses.unlearning``)."""
    options = options or DefenseRun()
    if options.scope == "head":
        head_of(loaded.net, loaded.config)
    check_tuning_data(split.tune, loaded)
    started = time.perf_counter()
    original = loaded.classifier()
    before = evaluate_triggers(original, split.heldout, triggers, options.probe_options(target=options.target),
                               device=device)
    targets = [t.target for t in before.triggers]
    full = options.history == "full"
    # Sparse history follows what cleaning must move: the flagged triggers, on a small fixed subset.
    tracked = [(trig, t) for trig, t, r in zip(triggers, targets, before.triggers, strict=True)
               if r.error is None and (full or r.flagged)]
    probe_data = split.heldout if full else history_subset(split.heldout, options.history_images)
    classifier = copy.deepcopy(original)
    history: list[dict[str, Any]] = []
    last: dict[str, Any] = {}

    def probe_row(epoch: int, lr: float, loss: float) -> None:
        probe = evaluate_triggers(classifier, probe_data, [p for p, _ in tracked],
                                  ProbeSettings(options.gates.scan, targets=[t for _, t in tracked],
                                               batch_size=options.batch_size, with_null=False, probe="full"),
                                  device=device)
        row = {"epoch": epoch + 1, "lr": lr, "loss": loss, "clean_accuracy": probe.clean_accuracy,
               "asr": {r.spec: r.asr for r in probe.triggers}, "n_images": len(probe_data)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)

    def record(epoch: int, lr: float, loss: float) -> None:
        # The same model state every epoch whatever is probed (device, layout, modes, as the
        # per-epoch probe always left it): the history never changes what is trained.
        classifier.to(device, memory_format=torch.channels_last)
        classifier.train()
        ctx.set_train_modes()
        last.update(epoch=epoch, lr=lr, loss=loss)
        if full or (epoch + 1) % options.history_every == 0:
            probe_row(epoch, lr, loss)
            last["probed"] = epoch

    allowed = None if options.unlearn_only is None else {id(t) for t in options.unlearn_only}
    flagged = [r.flagged and (allowed is None or id(t) in allowed) for t, r in zip(triggers, before.triggers,
                                                                                   strict=True)]
    unlearn = plan_unlearning(triggers, flagged, options.unlearn_fraction, options.unlearn_family)
    ctx = DefenseContext(classifier=classifier, config=loaded.config, tune=split.tune, device=device,
                         gen=gen, scope=options.scope, on_epoch=record if options.history != "off" else None,
                         unlearn=unlearn)
    result = defense.run(ctx)
    if unlearn is not None and ctx.extras.get("unlearning_applied"):
        result.unlearning = unlearn.describe()
    used = result.to_dict()
    classifier.eval()
    if last and last.get("probed") != last["epoch"]:  # the end of training is always in the history
        probe_row(last["epoch"], last["lr"], last["loss"])
    after = evaluate_triggers(classifier, split.heldout, triggers, options.probe_options(targets=targets),
                              device=device)
    used["history"] = {"mode": options.history, "every": 1 if full else options.history_every,
                       "images": len(probe_data), "triggers": [p.spec() for p, _ in tracked]}
    return CleanOutcome(before, after, history, used, time.perf_counter() - started, classifier)


def clean_reasons(outcome: CleanOutcome, gates: CleanGates) -> list[str]:
    reasons = [f"trigger {t.spec} still sends {t.asr:.1%} of held-out images to class {t.target_name!r} "
               f"after cleaning (gate {gates.scan.fail_asr:.0%})" for t in outcome.after.flagged]
    drop = outcome.before.clean_accuracy - outcome.after.clean_accuracy
    # Rounded: accuracies are float32 ratios of counts, and 12 of 600 images is exactly 2 points.
    if gates.max_accuracy_drop is not None and round(drop, 6) > gates.max_accuracy_drop:
        interval = accuracy_drop_interval(outcome)
        spread = "" if interval is None else \
            f"95 % CI {interval[0]:.1%} to {interval[1]:.1%} on {outcome.after.n_images} images; "
        reason = (f"clean accuracy fell by {drop:.1%} (from {outcome.before.clean_accuracy:.1%} to "
                  f"{outcome.after.clean_accuracy:.1%}; {spread}gate {gates.max_accuracy_drop:.1%})")
        if interval is not None and interval[0] <= gates.max_accuracy_drop:
            # The gate still fails (a utility gate errs on the side of caution) but says it is unsure.
            reason += " — within noise of the gate: more held-out images (--eval-data) would settle it"
        reasons.append(reason)
    return reasons


def accuracy_drop_interval(outcome: CleanOutcome) -> tuple[float, float] | None:
    """95 % interval of the accuracy lost, pairing each held-out image before and after cleaning."""
    before, after = outcome.before.clean_correct, outcome.after.clean_correct
    if before is None or after is None or len(before) != len(after):
        return None
    return paired_difference_interval(before, after)


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(v, 4) for v in interval]


def clean_section(defense: Defense, scope: str, outcome: CleanOutcome, out: Path | None) -> dict[str, Any]:
    return {
        "method": defense.name,
        "paper": defense.paper,
        "scope": scope,
        "output": str(out) if out else None,
        "hyperparameters": outcome.used,
        "before": scan_section(outcome.before),
        "after": scan_section(outcome.after),
        "accuracy_drop": outcome.before.clean_accuracy - outcome.after.clean_accuracy,
        "accuracy_drop_ci95": _rounded(accuracy_drop_interval(outcome)),
        "history": outcome.history,
        "seconds": outcome.seconds,
    }


def save_cleaned(outcome: CleanOutcome, loaded: LoadedModel, split: DataSplit, defense: Defense,
                 scope: str, out: Path, force: bool) -> None:
    """Keep the original metadata and add what was done and measured."""
    config = loaded.config.with_provenance(cleaned={
        "by": f"bdaudit {__version__} clean",
        "method": defense.name,
        "scope": scope,
        "source_sha256": loaded.sha256,
        "clean_data_sha256": split.info["tune_sha256"],
        # Settings and schedule only: diagnostics (range test, inversion tables) stay in the report.
        "hyperparameters": {k: v for k, v in outcome.used.items() if k in ("settings", "schedule")},
        "before": {"clean_accuracy": round(outcome.before.clean_accuracy, 4),
                   "asr": {t.spec: t.asr for t in outcome.before.triggers}},
        "after": {"clean_accuracy": round(outcome.after.clean_accuracy, 4),
                  "asr": {t.spec: t.asr for t in outcome.after.triggers}},
    })
    inputs = (loaded.path,) if loaded.path else ()
    save_model(outcome.classifier.net, config, out, force=force, aux=loaded.aux, inputs=inputs)

