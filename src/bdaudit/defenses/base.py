"""The defense interface and registry (BackdoorBox-style: one file per defense, same verbs).

A defense receives a ``DefenseContext`` — the classifier (taking [0, 1] images), the clean
tuning data, the scope and runtime — mutates the classifier in place, and returns the
hyper-parameters it actually used (for provenance and the report). Each defense documents what
it needs beyond clean data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bdaudit.core.coerce import parse_bool
from bdaudit.core.config import ModelConfig
from bdaudit.core.data import ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.core.heads import SCOPES, body_eval, freeze_body, head_of

__all__ = ["DEFENSES", "SCOPES", "Defense", "DefenseContext", "DefenseResult", "create_defense", "register_defense"]
from bdaudit.engine.loop import BatchTransform, Runtime

DEFENSES: dict[str, type[Defense]] = {}

# Called after each epoch with (epoch, lr at the end of the epoch, mean training loss).
EpochHook = Callable[[int, float, float], None]


def register_defense(cls: type[Defense]) -> type[Defense]:
    DEFENSES[cls.name] = cls
    return cls


@dataclass
class DefenseContext:
    """What every defense may use."""

    classifier: nn.Module  # NormalizedClassifier: takes images in [0, 1]
    config: ModelConfig
    tune: ImageSet
    device: torch.device
    gen: torch.Generator
    scope: str = "full"
    on_epoch: EpochHook | None = None
    # Applied to every tuning batch by ``tuning.fine_tune`` (e.g. ``unlearning.TriggerUnlearning``).
    unlearn: BatchTransform | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def net(self) -> nn.Module:
        return self.classifier.net  # type: ignore[return-value]

    def head(self) -> nn.Module:
        return head_of(self.net, self.config)

    def set_train_modes(self) -> None:
        """Head scope: the frozen body stays in eval mode so its BatchNorm statistics don't move."""
        if self.scope == "head":
            body_eval(self.net, self.head())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All parameters (scope full) or only the head's (scope head); freezes the rest."""
        if self.scope == "full":
            return list(self.net.parameters())
        return freeze_body(self.net, self.head())

    def require_full_scope(self, method: str, why: str) -> None:
        """For defenses that change the body too: scope head would silently train something else."""
        if self.scope != "full":
            raise BdauditError(f"method {method} {why}; set `scope` to full")

    def runtime(self) -> Runtime:
        return Runtime(self.gen, self.device)


@dataclass
class DefenseResult:
    """What a defense did: the settings it used, the schedule it ran and how its peak was chosen
    (rate-schedule defenses), what it found or changed (``details``, per defense), a ``note`` when
    it left the model unchanged, and the scan-flagged triggers it unlearned (set by the workflow)."""

    settings: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] | None = None
    peak_selection: dict[str, Any] | None = None
    note: str | None = None
    unlearning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report's ``hyperparameters`` (keys as before the type existed; absent ones omitted)."""
        out: dict[str, Any] = {"settings": self.settings}
        if self.schedule is not None:
            out["schedule"] = self.schedule
        if self.peak_selection is not None:
            out["peak_selection"] = self.peak_selection
        out.update(self.details)
        if self.note is not None:
            out["note"] = self.note
        if self.unlearning is not None:
            out["unlearning"] = self.unlearning
        return out


class Defense:
    """Base class: set ``name``, ``paper``, ``needs``, ``settings_cls``; implement ``run``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "clean labelled data"
    settings_cls: ClassVar[type] = object
    # Bumped when a fix changes what the defense does under unchanged settings, so bench cache cells
    # computed before it are recomputed (0 leaves every existing key as it was).
    revision: ClassVar[int] = 0

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_cls()

    def run(self, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError


def describe_defenses() -> list[dict[str, Any]]:
    """Name, paper, what it needs and its settings (with defaults) for every registered defense."""
    rows = []
    for name, cls in sorted(DEFENSES.items()):
        params = [{"name": f.name, "default": f.default, "type": str(f.type)}
                  for f in dataclasses.fields(cls.settings_cls)]
        rows.append({"name": name, "paper": cls.paper, "needs": cls.needs, "settings": params})
    return rows


def create_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """Build a registered defense from knob values (flags or YAML), checking names and types."""
    if name not in DEFENSES:
        raise BdauditError(f"unknown method '{name}'; choose one of {', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls.settings_cls)}
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise BdauditError(f"method {name} has no setting(s) {', '.join(unknown)}; its settings are "
                           f"{', '.join(fields)}")
    try:
        return cls(cls.settings_cls(**{k: _coerce(v, fields[k].type) for k, v in params.items()}))
    except (TypeError, ValueError) as exc:
        raise BdauditError(f"method {name}: bad setting ({exc})") from None


def _coerce(value: Any, annotation: Any) -> Any:
    text = str(annotation)
    if isinstance(value, str):
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("bool"):
            return parse_bool(value)
    if text.startswith("float") and isinstance(value, int):
        return float(value)
    return value
