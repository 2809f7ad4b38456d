"""The model's self-description: architecture, preprocessing, classes and provenance.

One place resolves it (``resolve_model_config``) with the precedence flags > YAML sidecar >
checkpoint metadata, and one place turns it into preprocessing (``Preprocessing``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bdaudit.core.errors import CheckpointError

METADATA_KEY = "bdaudit"
CONFIG_FIELDS = ("arch", "num_classes", "in_chans", "input_size", "mean", "std", "class_names",
                 "hflip", "head", "arch_kwargs", "provenance")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a classifier and feed it images in [0, 1]."""

    arch: str
    num_classes: int
    in_chans: int = 3
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    class_names: tuple[str, ...] | None = None
    hflip: bool = False  # may training flip images horizontally? (digits must not)
    head: str | None = None  # module name of the classifier head: the --scope head boundary
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """mean/std broadcast to ``in_chans`` entries."""
        mean = self.mean * self.in_chans if len(self.mean) == 1 else self.mean
        std = self.std * self.in_chans if len(self.std) == 1 else self.std
        return tuple(mean), tuple(std)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["class_names"] = list(self.class_names) if self.class_names else None
        return out

    def with_provenance(self, **entries: Any) -> ModelConfig:
        return dataclasses.replace(self, provenance={**self.provenance, **entries})


# Bounds that keep a hostile config from asking for absurd allocations before anything is checked.
MAX_CLASSES = 100_000
MAX_SIDE = 4096
MAX_CHANNELS = 64


def _int(value: Any, key: str, low: int, high: int) -> int:
    # bool is an int subclass and floats truncate silently: both are refused, like strings.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be a whole number, not {type(value).__name__}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{key} must be between {low} and {high}, not {number}")
    return number


def _stats(value: Any, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int | float | str) for v in values):
        raise ValueError(f"{key} must be a number or a list of numbers")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{key} must be finite numbers, not {list(out)}")
    if key == "std" and any(v <= 0 for v in out):
        raise ValueError(f"std must be positive (it divides every pixel), not {list(out)}")
    return out


def _normalize_fields(raw: Any, source: str) -> dict[str, Any]:
    """Validate and coerce a partial config from metadata, YAML or flags."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: the model config must be a mapping of {', '.join(CONFIG_FIELDS)}, "
                              f"not {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - set(CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown model-config keys {unknown}; "
                              f"allowed: {', '.join(CONFIG_FIELDS)}")
    out = {k: v for k, v in raw.items() if v is not None}
    try:
        if "arch" in out and (not isinstance(out["arch"], str) or not out["arch"].strip()):
            raise ValueError("arch must be a non-empty name")
        if "num_classes" in out:
            out["num_classes"] = _int(out["num_classes"], "num_classes", 1, MAX_CLASSES)
        if "in_chans" in out:
            out["in_chans"] = _int(out["in_chans"], "in_chans", 1, MAX_CHANNELS)
        if "input_size" in out:
            size = out["input_size"]
            if isinstance(size, str) or not isinstance(size, int | list | tuple) or isinstance(size, bool):
                raise ValueError(f"input_size must be a number or [H, W], not {type(size).__name__}")
            size = [size, size] if isinstance(size, int) else list(size)
            size = size * 2 if len(size) == 1 else size  # one number: square
            if len(size) == 3:  # timm's (C, H, W)
                out.setdefault("in_chans", _int(size[0], "in_chans", 1, MAX_CHANNELS))
                size = size[1:]
            if len(size) != 2:
                raise ValueError(f"input_size must be [H, W], not {len(size)} numbers")
            out["input_size"] = (_int(size[0], "input_size", 1, MAX_SIDE), _int(size[1], "input_size", 1, MAX_SIDE))
        for key in ("mean", "std"):
            if key in out:
                out[key] = _stats(out[key], key)
        if "class_names" in out:
            names = out["class_names"]
            if not isinstance(names, list | tuple) or not all(isinstance(c, str | int) for c in names):
                raise ValueError("class_names must be a list of names")
            out["class_names"] = tuple(str(c) for c in names)
        if "hflip" in out:
            flag = out["hflip"]
            flag = {"true": True, "false": False}.get(flag.lower(), flag) if isinstance(flag, str) else flag
            if not isinstance(flag, bool):
                raise ValueError("hflip must be true or false")
            out["hflip"] = flag
        if "head" in out and not isinstance(out["head"], str):
            raise ValueError("head must be a module name")
        for key in ("arch_kwargs", "provenance"):
            if key in out and not isinstance(out[key], dict):
                raise ValueError(f"{key} must be a mapping, not {type(out[key]).__name__}")
        if "arch_kwargs" in out and not all(isinstance(k, str) for k in out["arch_kwargs"]):
            raise ValueError("arch_kwargs keys must be names")
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{source}: malformed model config ({exc}); fix it or override it with "
                              "flags or `model_config`") from None
    return out


def read_sidecar(path: Path) -> dict[str, Any]:
    """A YAML model config (``MODEL.yaml`` next to the checkpoint, or ``--model-config``)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read model config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise CheckpointError(f"model config {path} is not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model config {path} must be a YAML mapping of {', '.join(CONFIG_FIELDS)}")
    return _normalize_fields(data, str(path))


def read_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The config bdaudit stores in a safetensors header (or flat keys other tools write)."""
    if not metadata:
        return {}
    if METADATA_KEY in metadata:
        try:
            return _normalize_fields(json.loads(metadata[METADATA_KEY]), "checkpoint metadata")
        except (json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint metadata '{METADATA_KEY}' is not valid JSON ({exc}); "
                                  "override it with `model_config` or flags") from None
    flat: dict[str, Any] = {("arch" if k == "architecture" else k): v for k, v in metadata.items()
                            if k in CONFIG_FIELDS or k == "architecture"}
    for key, value in list(flat.items()):
        if isinstance(value, str) and value[:1] in "[{":
            try:
                flat[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise CheckpointError(f"checkpoint metadata '{key}' is not valid JSON ({exc}); "
                                      "override it with `model_config` or flags") from None
    return _normalize_fields(flat, "checkpoint metadata")


def write_metadata(config: ModelConfig) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True), "format": "pt"}


def resolve_model_config(metadata: dict[str, Any], sidecar: dict[str, Any],
                         flags: dict[str, Any], source: str) -> ModelConfig:
    """Merge partial configs with precedence flags > sidecar > metadata."""
    merged = {**metadata, **sidecar, **_normalize_fields(flags, "command-line flags")}
    if "class_names" in merged and "num_classes" not in merged:
        merged["num_classes"] = len(merged["class_names"])
    missing = [k for k in ("arch", "num_classes") if k not in merged]
    if missing:
        raise CheckpointError(
            f"{source} does not say its {' and '.join(missing)}: pass `arch`/`num_classes`, "
            "a MODEL.yaml sidecar, or `model_config` FILE")
    names = merged.get("class_names")
    if names and len(names) != merged["num_classes"]:
        raise CheckpointError(f"{len(names)} class names given but num_classes is "
                              f"{merged['num_classes']}; make them agree")
    config = ModelConfig(**merged)
    mean, std = config.channel_stats()
    if len(mean) != config.in_chans or len(std) != config.in_chans:
        raise CheckpointError(f"mean/std have {len(config.mean)}/{len(config.std)} entries but the "
                              f"model has {config.in_chans} input channels")
    return config
