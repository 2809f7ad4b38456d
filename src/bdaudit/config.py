"""The model's self-description: architecture, preprocessing, classes and provenance.

One place resolves it (``resolve_model_config``) with the precedence flags > YAML sidecar >
checkpoint metadata, and one place turns it into preprocessing (``Preprocessing``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bdaudit.errors import CheckpointError

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


def _normalize_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate and coerce a partial config from metadata, YAML or flags."""
    unknown = sorted(set(raw) - set(CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown model-config keys {unknown}; "
                              f"allowed: {', '.join(CONFIG_FIELDS)}")
    out = {k: v for k, v in raw.items() if v is not None}
    try:
        if "num_classes" in out:
            out["num_classes"] = int(out["num_classes"])
        if "in_chans" in out:
            out["in_chans"] = int(out["in_chans"])
        if "input_size" in out:
            size = out["input_size"]
            size = [size, size] if isinstance(size, int) else list(size)
            if len(size) == 3:  # timm's (C, H, W)
                out.setdefault("in_chans", int(size[0]))
                size = size[1:]
            out["input_size"] = (int(size[0]), int(size[1]))
        for key in ("mean", "std"):
            if key in out:
                value = out[key]
                out[key] = tuple(float(v) for v in (value if isinstance(value, list | tuple) else [value]))
        if "class_names" in out:
            out["class_names"] = tuple(str(c) for c in out["class_names"])
        if "hflip" in out:
            out["hflip"] = bool(out["hflip"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: malformed model config ({exc})") from None
    return out


def read_sidecar(path: Path) -> dict[str, Any]:
    """A YAML model config (``MODEL.yaml`` next to the checkpoint, or ``--model-config``)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model config {path} must be a YAML mapping of {CONFIG_FIELDS}")
    return _normalize_fields(data, str(path))


def read_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The config bdaudit stores in a safetensors header (or flat keys other tools write)."""
    if not metadata:
        return {}
    if METADATA_KEY in metadata:
        try:
            return _normalize_fields(json.loads(metadata[METADATA_KEY]), "checkpoint metadata")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint metadata '{METADATA_KEY}' is not JSON: {exc}") from None
    flat = {("arch" if k == "architecture" else k): v for k, v in metadata.items()
            if k in CONFIG_FIELDS or k == "architecture"}
    for key, value in list(flat.items()):
        if isinstance(value, str) and value[:1] in "[{":
            flat[key] = json.loads(value)
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
            f"{source} does not say its {' and '.join(missing)}: pass --arch/--num-classes, "
            "a MODEL.yaml sidecar, or --model-config FILE")
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
