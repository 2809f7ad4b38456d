"""``bdaudit clean``: remove a backdoor with a defense (FT-SAM plus trigger unlearning by default)
and prove both sides — the backdoor's ASR fell and the clean accuracy held."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdaudit import __version__
from bdaudit.core.data import DataSplit, ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.defenses import SCOPES, Defense, DefenseContext
from bdaudit.defenses.base import head_module
from bdaudit.defenses.unlearning import UNLEARN_FAMILY_SHARE, plan_unlearning
from bdaudit.detect.probe import Gates, ProbeOptions, ScanResult, evaluate_triggers
from bdaudit.models.checkpoint import LoadedModel, save_model
from bdaudit.report.document import scan_section
from bdaudit.triggers import Trigger

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
                           "in all); add images or lower --holdout")


def run_defense(defense: Defense, loaded: LoadedModel, split: DataSplit, triggers: Sequence[Trigger], *,
                scope: str, device: torch.device, gen: torch.Generator, batch_size: int,
                gates: CleanGates, target: int | None = None,
                on_epoch: Callable[[dict[str, Any]], None] | None = None,
                track_history: bool = True, unlearn_fraction: float = 0.0,
                unlearn_family: float = UNLEARN_FAMILY_SHARE,
                unlearn_only: Sequence[Trigger] | None = None) -> CleanOutcome:
    """Scan, clean a copy of the model, scan again at the targets found before. With
    ``unlearn_fraction``, tuning defenses also unlearn the triggers the first scan flagged
    (``defenses.unlearning``) — of ``unlearn_only`` if given (the rest are only measured)."""
    if scope not in SCOPES:
        raise BdauditError(f"--scope must be one of {', '.join(SCOPES)}, not '{scope}'")
    if scope == "head":
        head_module(loaded.net, loaded.config)
    check_tuning_data(split.tune, loaded)
    started = time.perf_counter()
    original = loaded.classifier()
    before = evaluate_triggers(original, split.heldout, triggers,
                               ProbeOptions(gates.scan, target, batch_size=batch_size), device=device)
    targets = [t.target for t in before.triggers]
    usable = [(trig, t) for trig, t, r in zip(triggers, targets, before.triggers, strict=True)
              if r.error is None]
    classifier = copy.deepcopy(original)
    history: list[dict[str, Any]] = []

    def record(epoch: int, lr: float, loss: float) -> None:
        probe = evaluate_triggers(classifier, split.heldout, [p for p, _ in usable],
                                  ProbeOptions(gates.scan, targets=[t for _, t in usable], batch_size=batch_size,
                                               with_null=False, probe="full"), device=device)
        classifier.train()  # evaluate_triggers leaves eval mode; the loop expects train mode
        ctx.set_train_modes()
        row = {"epoch": epoch + 1, "lr": lr, "loss": loss, "clean_accuracy": probe.clean_accuracy,
               "asr": {r.spec: r.asr for r in probe.triggers}}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)

    allowed = None if unlearn_only is None else {id(t) for t in unlearn_only}
    flagged = [r.flagged and (allowed is None or id(t) in allowed) for t, r in zip(triggers, before.triggers,
                                                                                   strict=True)]
    unlearn = plan_unlearning(triggers, flagged, unlearn_fraction, unlearn_family)
    ctx = DefenseContext(classifier=classifier, config=loaded.config, tune=split.tune, device=device,
                         gen=gen, scope=scope, on_epoch=record if track_history else None, unlearn=unlearn)
    used = defense.run(ctx)
    if unlearn is not None and ctx.extras.get("unlearning_applied"):
        used["unlearning"] = unlearn.describe()
    classifier.eval()
    after = evaluate_triggers(classifier, split.heldout, triggers,
                              ProbeOptions(gates.scan, targets=targets, batch_size=batch_size), device=device)
    return CleanOutcome(before, after, history, used, time.perf_counter() - started, classifier)


def clean_reasons(outcome: CleanOutcome, gates: CleanGates) -> list[str]:
    reasons = [f"trigger {t.spec} still sends {t.asr:.1%} of held-out images to class {t.target_name!r} "
               f"after cleaning (gate {gates.scan.fail_asr:.0%})" for t in outcome.after.flagged]
    drop = outcome.before.clean_accuracy - outcome.after.clean_accuracy
    # Rounded: accuracies are float32 ratios of counts, and 12 of 600 images is exactly 2 points.
    if gates.max_accuracy_drop is not None and round(drop, 6) > gates.max_accuracy_drop:
        reasons.append(f"clean accuracy fell by {drop:.1%} (from {outcome.before.clean_accuracy:.1%} to "
                       f"{outcome.after.clean_accuracy:.1%}; gate {gates.max_accuracy_drop:.1%})")
    return reasons


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

