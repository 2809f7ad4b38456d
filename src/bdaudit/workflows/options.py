"""The typed option objects every workflow (and so ``bdaudit.api``) takes instead of long
parameter lists. Each groups one concern; errors name the field (the CLI maps it to its flag)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdaudit.core.defaults import DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION
from bdaudit.core.errors import BdauditError
from bdaudit.sequela.audit import SequelaGates

if TYPE_CHECKING:
    from bdaudit.models.checkpoint import LoadedModel


@dataclass(frozen=True)
class Runtime:
    """Where and how to compute: shared by every command. ``batch_size`` None: evaluation batches
    are sized by measurement per model and device (``core.predict``); planting trains at 128."""

    device: str = "auto"
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise BdauditError(f"`batch_size` must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class ModelOptions:
    """A checkpoint and how to read it: ``flags`` override its config (highest precedence),
    ``config`` is a YAML model config (default: the sidecar beside the checkpoint). With several
    models, ``path`` is filled in per model."""

    path: str | Path | None = None
    flags: dict[str, Any] | None = None
    config: str | Path | None = None

    @classmethod
    def of(cls, model: str | Path | ModelOptions) -> ModelOptions:
        return model if isinstance(model, ModelOptions) else cls(path=model)

    def load(self, path: str | Path | None = None) -> LoadedModel:
        """The checkpoint at ``path`` (default: ``self.path``), read with these flags and config."""
        from bdaudit.models.checkpoint import load_model

        return load_model(self.path if path is None else path, self.flags, self.config)


@dataclass(frozen=True)
class DataOptions:
    """The clean data and how it is split into tuning and held-out parts."""

    path: Path
    eval_path: Path | None = None
    holdout: float = 0.2


@dataclass(frozen=True)
class ProbeOptions:
    """Which triggers to probe and how to look for unknown ones.

    ``triggers`` (specs) and ``triggers_file`` (YAML) choose known triggers (default: the whole
    library); ``target`` fixes the target class; ``detect`` (auto/on/off) runs the unknown-trigger
    detector; ``invert`` also runs Neural Cleanse over every class. ``confirm_all`` makes ``scan``'s
    detector test every nominated class rather than stop at the first finding (``clean`` always does)."""

    triggers: Sequence[str] = ()
    triggers_file: str | Path | None = None
    target: int | None = None
    detect: str = "auto"
    invert: bool = False
    confirm_all: bool = False

    @property
    def explicit(self) -> bool:
        """The user asked for specific triggers (then ``detect=auto`` stays off)."""
        return bool(self.triggers or self.triggers_file)


@dataclass(frozen=True)
class SequelaOptions:
    """What the sequela audit may use beyond the clean data."""

    members: Path | None = None  # known training samples of the original model
    reference: Path | None = None  # a clean reference model of the same kind
    gates: SequelaGates = SequelaGates()
    reinjection: dict[str, Any] | None = None  # retuning-attack settings (budget_steps, lr, ...)


@dataclass(frozen=True)
class CleanOptions:
    """How to clean: the defense ``method`` and its ``settings``, the ``scope`` tuned, the share of
    each tuning batch that unlearns flagged triggers, (if given) the sequela audit to run, and how
    much per-epoch ``history`` to record."""

    method: str = DEFAULT_METHOD
    settings: dict[str, Any] | None = None
    scope: str = "full"
    unlearn_fraction: float = DEFAULT_UNLEARN_FRACTION
    sequela: SequelaOptions | None = None
    # sparse: the history probes the flagged triggers on a small fixed subset every few epochs;
    # full: every trigger on every held-out image after every epoch (workflows.clean.DefenseRun)
    history: str = "sparse"


@dataclass(frozen=True)
class OutputOptions:
    """Where a command writes its model (None: measure only) and whether it may replace a file."""

    out: Path | None = None
    force: bool = False
