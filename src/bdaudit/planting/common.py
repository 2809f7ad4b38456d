"""What the transfer and encoder paradigms share: the victim's label space, the head boundary
and measuring a known trigger."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdaudit.core.config import ModelConfig
from bdaudit.core.data import ImageSet, _class_folders
from bdaudit.core.errors import TriggerError
from bdaudit.detect.probe import ProbeSettings, evaluate_triggers, trigger_fit_error
from bdaudit.engine.loop import accuracy
from bdaudit.triggers import Trigger

EpochCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class PlantRun:
    """How a plant run is held, whatever the paradigm: the held-out split (``eval_dir`` or a
    ``holdout`` share), the seed, the device and how the output is written."""

    eval_dir: str | Path | None = None
    holdout: float = 0.2
    seed: int = 0
    device: str = "auto"
    force: bool = False  # replace an existing output
    half: bool = False  # save float16 weights


def victim_config(upstream: ModelConfig, data_dir: Path) -> tuple[ModelConfig, bool]:
    """The victim's model config and whether its head must be re-initialised.

    Data whose class folders are all upstream classes is the same task (the victim fine-tunes
    on its own data) and keeps the head; any other folder is a new task with a new head.
    Preprocessing (channels, size, mean/std) always stays the upstream's: it is part of the
    pre-trained model.
    """
    folders = tuple(f.name for f in _class_folders(Path(data_dir)))
    names = upstream.class_names
    same_task = set(folders) <= set(names) if names else len(folders) <= upstream.num_classes
    if same_task:
        return upstream, False
    return dataclasses.replace(upstream, num_classes=len(folders), class_names=folders), True


def with_head_name(config: ModelConfig, net: nn.Module) -> ModelConfig:
    """Record the head's module name (``fc`` for bdaudit's CNNs): the encoder/head boundary
    that ``clean --scope head`` uses."""
    if config.head or not hasattr(net, "get_classifier"):
        return config
    head = net.get_classifier()
    name = next((name for name, module in net.named_modules() if module is head), None)
    return dataclasses.replace(config, head=name)


def check_trigger_fits(trigger: Trigger, data: ImageSet) -> None:
    problem = trigger_fit_error(trigger, data)
    if problem:
        raise TriggerError(problem)


def measure_trigger(classifier: nn.Module, heldout: ImageSet, trigger: Trigger | None,
                    target: int | None, device: torch.device, batch_size: int = 256,
                    ) -> dict[str, Any]:
    """Held-out clean accuracy and the trigger's ASR at ``target`` (None: the most-hit class)."""
    if trigger is None:
        return {"clean_accuracy": accuracy(classifier, heldout, batch_size, device)}
    result = evaluate_triggers(classifier, heldout, [trigger],
                               ProbeSettings(batch_size=batch_size, target=target, probe="full"), device=device)
    probe = result.triggers[0]
    return {"clean_accuracy": result.clean_accuracy, "asr": probe.asr, "null_asr": probe.null_asr,
            "asr_target": probe.target}


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as provenance stores them."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if v is not None}
