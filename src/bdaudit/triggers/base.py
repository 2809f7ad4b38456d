"""The trigger interface and registry.

A trigger is a frozen dataclass whose fields are its documented parameters. ``apply`` is a pure
function on a batch of images in [0, 1] (N, C, H, W), any C in {1, 3} and any size; ``null`` is
the matched null perturbation (same area and strength, no trigger pattern) that tells a backdoor
from the model's natural sensitivity to that much change.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bdaudit.core.coerce import parse_bool
from bdaudit.core.errors import TriggerError

TRIGGERS: dict[str, type[Trigger]] = {}


@dataclass(frozen=True)
class Trigger:
    """Base class: subclasses set ``name``, ``paper``, ``summary`` and implement apply/null."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # False for triggers that cannot be built from parameters alone (e.g. Input-aware's
    # generator rides in the checkpoint), so they stay out of the default library.
    in_default_library: ClassVar[bool] = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def null(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def variant(self, seed: int) -> Trigger:
        """Another member of the same family (same parameters, pattern drawn from ``seed``);
        families without a seeded pattern return themselves."""
        if "seed" not in {f.name for f in dataclasses.fields(self)}:
            return self
        return dataclasses.replace(self, seed=seed)  # type: ignore[call-arg]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """Round-trips through ``parse_trigger``: ``name:key=value,...`` (non-default values only)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        items = ",".join(f"{k}={v}" for k, v in self.params().items()
                         if isinstance(v, str | int | float | bool) and v != defaults.get(k))
        return f"{self.name}:{items}" if items else self.name


def register_trigger(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: adds a trigger family to the registry under ``cls.name``."""
    if not cls.name or cls.name in TRIGGERS:
        raise ValueError(f"trigger name {cls.name!r} is empty or already registered")
    TRIGGERS[cls.name] = cls
    return cls


def _coerce(value: Any, annotation: Any, key: str, name: str) -> Any:
    target = typing.get_args(annotation)[0] if typing.get_origin(annotation) else annotation
    if isinstance(target, str):  # postponed annotations
        target = {"int": int, "float": float, "bool": bool, "str": str}.get(target.split("|")[0].strip(), str)
    if target is bool and isinstance(value, str):
        try:
            return parse_bool(value)
        except ValueError:
            raise TriggerError(f"trigger {name}: {key}={value!r} is not a boolean") from None
    if target in (int, float, str, bool):
        try:
            return target(value)
        except (TypeError, ValueError):
            raise TriggerError(f"trigger {name}: {key}={value!r} is not a {target.__name__}") from None
    return value


def create_trigger(name: str, **params: Any) -> Trigger:
    """Build a registered trigger, validating parameter names and types."""
    if name not in TRIGGERS:
        raise TriggerError(f"unknown trigger '{name}'; known: {', '.join(sorted(TRIGGERS))} "
                           "(bdaudit triggers lists them)")
    cls = TRIGGERS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise TriggerError(f"trigger {name}: unknown parameter(s) {unknown}; "
                           f"allowed: {', '.join(fields) or 'none'}")
    coerced = {k: _coerce(v, fields[k].type, k, name) for k, v in params.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise TriggerError(f"trigger {name}: {exc}") from None


def parse_trigger(spec: str) -> Trigger:
    """``badnets`` or ``badnets:size=4,position=tl`` → a Trigger."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise TriggerError(f"trigger spec '{spec}': '{item}' is not key=value")
        params[key.strip()] = value.strip()
    return create_trigger(name.strip(), **params)


def default_triggers() -> list[Trigger]:
    """The whole parameter-only library at default settings (what ``scan`` probes)."""
    return [cls() for name, cls in sorted(TRIGGERS.items()) if cls.in_default_library]


def describe_triggers() -> list[dict[str, Any]]:
    """Name, summary, paper and parameters (with defaults and types) of every family."""
    rows = []
    for name, cls in sorted(TRIGGERS.items()):
        params = [{"name": f.name, "type": str(f.type), "default": f.default
                   if f.default is not dataclasses.MISSING else None}
                  for f in dataclasses.fields(cls)]
        rows.append({"name": name, "summary": cls.summary, "paper": cls.paper, "params": params})
    return rows


def seeded_pattern(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) noise that depends only on (seed, shape): the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device)


# Triggers that live in a checkpoint rather than in parameters (e.g. an Input-aware generator):
# aux-tensor prefix -> factory(tensors under that prefix) -> Trigger.
CarriedFactory = Callable[[dict[str, torch.Tensor]], Trigger]
CARRIED_TRIGGERS: dict[str, CarriedFactory] = {}


def register_carried_trigger(prefix: str, factory: CarriedFactory) -> None:
    CARRIED_TRIGGERS[prefix] = factory


def model_triggers(aux: dict[str, torch.Tensor]) -> list[Trigger]:
    """Triggers rebuilt from tensors a checkpoint carries (see ``checkpoint.AUX_PREFIX``)."""
    found = []
    for prefix, factory in sorted(CARRIED_TRIGGERS.items()):
        tensors = {k[len(prefix) + 1:]: v for k, v in aux.items() if k.startswith(prefix + ".")}
        if tensors:
            found.append(factory(tensors))
    return found
