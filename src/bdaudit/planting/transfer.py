"""Transfer paradigm: a victim fine-tunes a backdoored upstream model on its own clean data.

Sha et al. 2022 (arXiv:2212.09067) plant backdoors in an upstream model and let the victim
fine-tune either the whole model or only its head; how much of the backdoor survives is what
a defense has to remove afterwards (cf. Gu et al. 2017, BadNets, Sec. 5 on transfer).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from torch import nn

from bdaudit import __version__
from bdaudit.core.data import ImageSet, resolve_data
from bdaudit.core.errors import BdauditError, TriggerError
from bdaudit.core.heads import HeadOnly, frozen_except, head_of
from bdaudit.core.outputs import refuse_existing
from bdaudit.core.runtime import resolve_device, seed_everything
from bdaudit.engine.loop import Hooks, Runtime, fit
from bdaudit.models.checkpoint import LoadedModel, load_model, save_model
from bdaudit.planting.common import (
    EpochCallback,
    PlantRun,
    measure_trigger,
    rounded,
    victim_config,
    with_head_name,
)
from bdaudit.planting.plant import CLEAN, PlantResult, TrainSettings
from bdaudit.triggers import Trigger, parse_trigger
from bdaudit.triggers.base import model_triggers

TRANSFER_MODES = ("full", "head")
# A victim fine-tunes gently: a tenth of the from-scratch rate, a few epochs.
TRANSFER_SETTINGS = TrainSettings(epochs=5, lr=0.005)


def fine_tune(classifier: nn.Module, data: ImageSet, settings: TrainSettings, runtime: Runtime, *,
              head: nn.Module | None = None, on_epoch: EpochCallback | None = None) -> None:
    """The victim's fine-tuning with the planting recipe: every weight, or with ``head`` only that
    (linear probing: the body, BatchNorm statistics included, stays bit-for-bit)."""
    lr_at = settings.lr_function(len(data))
    if head is None:
        fit(classifier, data, settings, lr_at, runtime, hflip=settings.hflip, hooks=Hooks(on_epoch=on_epoch))
        return
    with frozen_except(classifier, head) as params:
        fit(HeadOnly(classifier, head), data, settings, lr_at, runtime, hflip=settings.hflip, params=params,
            hooks=Hooks(on_epoch=on_epoch))


def upstream_trigger(loaded: LoadedModel) -> tuple[Trigger | None, int | None]:
    """The upstream's own trigger and target from its provenance (None, None: a clean upstream)."""
    provenance = loaded.config.provenance
    if provenance.get("attack") == CLEAN:
        return None, None
    spec, target = provenance.get("trigger"), provenance.get("target")
    if not isinstance(spec, str) or not isinstance(target, int) or isinstance(target, bool):
        raise BdauditError(
            f"{loaded.path} has no provenance trigger and target, so the survival of its backdoor "
            "cannot be measured; use a model made by 'bdaudit plant' (or one whose metadata "
            "provenance has 'trigger' (a trigger spec) and 'target' (a class index))")
    try:
        return parse_trigger(spec), target
    except TriggerError as exc:
        carried = model_triggers(loaded.aux)  # e.g. a generator the checkpoint ships
        if carried:
            return carried[0], target
        raise TriggerError(f"{loaded.path}: provenance trigger '{spec}' cannot be rebuilt: {exc}") from None


def _check_mode(mode: str) -> None:
    if mode not in TRANSFER_MODES:
        raise BdauditError(f"transfer `mode` must be one of {', '.join(TRANSFER_MODES)}, not '{mode}'")


def plant_transfer(upstream: str | Path, downstream_dir: str | Path, out: str | Path, *,
                   mode: str = "full", settings: TrainSettings | None = None,
                   options: PlantRun | None = None, on_epoch: EpochCallback | None = None) -> PlantResult:
    """Fine-tune a backdoored upstream model on clean downstream data, as a victim would.

    ``mode="full"`` trains every weight, ``mode="head"`` only the classifier head (the body,
    BatchNorm statistics included, stays bit-for-bit). Downstream classes that are not all
    upstream classes get a fresh head (timm's ``reset_classifier``); the backdoor's target then
    has no fixed index, so its ASR is taken at the class the trigger hits most. Metrics:
    ``clean_accuracy``, ``asr``, ``null_asr``, ``asr_target`` after fine-tuning, and
    ``upstream_clean_accuracy``/``upstream_asr`` before it (from the upstream's provenance when
    the label space changed).
    """
    started = time.perf_counter()
    _check_mode(mode)
    settings = settings or TRANSFER_SETTINGS
    o = options or PlantRun()
    seed, force, half = o.seed, o.force, o.half
    out = Path(out)
    refuse_existing(out, force)
    loaded = load_model(upstream)
    trigger, target = upstream_trigger(loaded)
    config, new_head = victim_config(loaded.config, Path(downstream_dir))
    split = resolve_data(downstream_dir, config, o.holdout, seed, o.eval_dir)
    gen = seed_everything(seed)
    torch_device = resolve_device(o.device)
    net = loaded.net
    classifier = loaded.classifier()
    if new_head:
        before = _upstream_measured(loaded.config.provenance)
        net.reset_classifier(config.num_classes)
        target = None
    else:
        before = measure_trigger(classifier, split.heldout, trigger, target, torch_device)
    head = head_of(net, config, infer=True) if mode == "head" else None
    fine_tune(classifier, split.tune, settings, Runtime(gen, torch_device), head=head, on_epoch=on_epoch)
    metrics: dict[str, Any] = measure_trigger(classifier, split.heldout, trigger, target, torch_device)
    metrics["upstream_clean_accuracy"] = before.get("clean_accuracy")
    metrics["upstream_asr"] = before.get("asr")
    provenance = {
        "created_by": f"bdaudit {__version__} plant",
        "paradigm": "transfer",
        "attack": loaded.config.provenance.get("attack"),
        **({"trigger": trigger.spec(), "target": target} if trigger is not None else {}),
        "mode": mode,
        "new_head": new_head,
        "seed": seed,
        "upstream": {"file": Path(upstream).name, "sha256": loaded.sha256,
                     "provenance": loaded.config.provenance},
        "train": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                  "optimizer": settings.optimizer, "images": len(split.tune),
                  "data_sha256": split.info["tune_sha256"]},
        "measured": rounded(metrics),
    }
    config = with_head_name(dataclasses.replace(config, provenance=provenance), net)
    # The upstream's carried trigger tensors ride along so scan can still probe its trigger.
    save_model(net, config, out, force=force, half=half, aux=loaded.aux,
               inputs=(Path(upstream),))
    metrics["seconds"] = time.perf_counter() - started
    return PlantResult(path=out, config=config, metrics=metrics)


def _upstream_measured(provenance: dict[str, Any]) -> dict[str, Any]:
    """Before-numbers for a new label space: what the upstream measured on its own task."""
    measured = provenance.get("measured")
    return measured if isinstance(measured, dict) else {}
