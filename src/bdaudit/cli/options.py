"""The CLI's shared option types, declared once so every command spells a flag the same way, and
the option *groups* (model flags, gates, sequela) a command takes as one typed argument.

A group is a dataclass whose fields are typer options; ``@option_groups`` puts its fields into the
command's signature in place of the one argument and hands the command the filled-in object, so
the eight model flags are written here once, not in every command.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bdaudit.core.defaults import DEFAULT_FAIL_ASR, DEFAULT_FAMILY_ASR, DEFAULT_NULL_MARGIN
from bdaudit.core.errors import BdauditError

if TYPE_CHECKING:
    from bdaudit import api


ModelPath = Annotated[Path, typer.Argument(help="Checkpoint (.safetensors, .pt/.pth/.bin/.ckpt state dict), "
                                           "a timm/Hugging Face model folder, or hf-hub:ORG/NAME from the "
                                           "local cache.", show_default=False)]
DataDir = Annotated[Path, typer.Option("--data", "-d", help="Clean labelled images, DIR/<class>/*.",
                                       show_default=False)]
EvalDir = Annotated[Path | None, typer.Option("--eval-data", help="Separate held-out images "
                                              "(then all of --data is for tuning).")]
Holdout = Annotated[float, typer.Option(help="Share of --data held out for evaluation.")]
Arch = Annotated[str | None, typer.Option(help="timm model name, torchvision:NAME, or your own "
                                          "module:callable (only ever imported when you name it).",
                                          rich_help_panel="Model")]
NumClasses = Annotated[int | None, typer.Option(help="Number of classes.", rich_help_panel="Model")]
InChans = Annotated[int | None, typer.Option(help="Input channels (1 or 3).", rich_help_panel="Model")]
InputSize = Annotated[str | None, typer.Option(help="H,W (or one number).", rich_help_panel="Model")]
Mean = Annotated[str | None, typer.Option(help="Per-channel mean, comma-separated.",
                                          rich_help_panel="Model")]
Std = Annotated[str | None, typer.Option(help="Per-channel std, comma-separated.",
                                         rich_help_panel="Model")]
ClassNames = Annotated[str | None, typer.Option(help="Class names in output order, comma-separated.",
                                                rich_help_panel="Model")]
ModelConfigFile = Annotated[Path | None, typer.Option("--model-config", help="YAML model config "
                                                      "(default: MODEL.yaml beside the checkpoint).",
                                                      rich_help_panel="Model")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.", rich_help_panel="Runtime")]
BatchSize = Annotated[int, typer.Option(help="Batch size.", rich_help_panel="Runtime")]
EvalBatchSize = Annotated[int | None, typer.Option(
    "--batch-size", help="Evaluation batch size (default: measured per model and device).",
    rich_help_panel="Runtime")]
Seed = Annotated[int, typer.Option(help="Seed for every random choice.", rich_help_panel="Runtime")]
JsonOut = Annotated[str | None, typer.Option("--json", help="Write the JSON report here (- for stdout).",
                                             rich_help_panel="Output")]
SarifOut = Annotated[Path | None, typer.Option("--sarif", help="Write a SARIF 2.1.0 log here (for "
                                              "code-scanning views).", rich_help_panel="Output")]
HtmlOut = Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here.",
                                             rich_help_panel="Output")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML file of flag values (default: "
                                                 "./bdaudit.yaml if present; flags typed here win).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the verdict.",
                                     rich_help_panel="Output")]
Debug = Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel="Output")]
FailAsr = Annotated[float, typer.Option(help="Gate: fail when a trigger's ASR reaches this "
                                        "(and beats its null rate by --null-margin).",
                                        rich_help_panel="Gates")]
NullMargin = Annotated[float, typer.Option(help="Gate: how far ASR must exceed the matched null "
                                           "perturbation's rate to count.", rich_help_panel="Gates")]
FamilyAsr = Annotated[float | None, typer.Option(help="Gate: fail when a trigger AND its matched null "
                                              "both reach this (the model answers the whole trigger "
                                              "family); 0 turns it off.",
                                              rich_help_panel="Gates")]
TriggerSpecs = Annotated[list[str] | None, typer.Option("--trigger", "-t", help="NAME[:key=value,...]"
                                                        " (repeatable; default: the whole library).")]
TriggersFile = Annotated[Path | None, typer.Option("--triggers", help="YAML list of triggers.")]
Detect = Annotated[str, typer.Option(
    "--detect", help="Unknown-trigger detector (patch and whole-image trigger inversion, ~10 s for a small "
                     "10-class CPU model): auto (default: on, unless --trigger/--triggers ask for specific "
                     "triggers), on, or off.")]
Target = Annotated[int | None, typer.Option(help="Fix the target class index instead of searching.")]


MethodSettings = Annotated[list[str] | None, typer.Option(
    "--set", help="A method setting KEY=VALUE (repeatable), e.g. --set prune_ratio_max=0.5; "
    "`bdaudit methods` lists each method's settings.", rich_help_panel="Tuning")]


SEQ = "Sequela"
Original = Annotated[Path | None, typer.Option(help="The model before cleaning.", rich_help_panel=SEQ)]
Members = Annotated[Path | None, typer.Option(help="Known training samples of the original (ImageFolder).",
                                             rich_help_panel=SEQ)]
Reference = Annotated[Path | None, typer.Option(help="A clean reference model of the same kind.",
                                               rich_help_panel=SEQ)]
MaxMiaAuc = Annotated[float | None, typer.Option(help="Gate: highest tolerated membership-inference AUC.",
                                                 rich_help_panel="Gates")]
MaxReinjection = Annotated[float | None, typer.Option(help="Gate: highest tolerated ASR after the "
                                                      "retuning attack.", rich_help_panel="Gates")]
ReinjectionSteps = Annotated[int | None, typer.Option(help="Retuning attack budget in SGD steps.",
                                                      rich_help_panel=SEQ)]


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BdauditError(f"`{flag}` must be comma-separated numbers, not '{text}'") from None


@dataclass(frozen=True)
class ModelFlags:
    """How to read a checkpoint: config overrides (highest precedence) and a model config file."""

    arch: Arch = None
    num_classes: NumClasses = None
    in_chans: InChans = None
    input_size: InputSize = None
    mean: Mean = None
    std: Std = None
    class_names: ClassNames = None
    model_config: ModelConfigFile = None

    def overrides(self) -> dict[str, Any]:
        """Model-config overrides from flags, parsed and checked."""
        size = _floats(self.input_size, "input_size")
        if size is not None and (len(size) not in (1, 2) or any(v < 1 or v != int(v) for v in size)):
            raise BdauditError(f"`input_size` takes H,W or one number (whole pixels), not '{self.input_size}'")
        return {
            "arch": self.arch, "num_classes": self.num_classes, "in_chans": self.in_chans,
            "input_size": [int(size[0]), int(size[-1])] if size else None,
            "mean": _floats(self.mean, "mean"), "std": _floats(self.std, "std"),
            "class_names": [c.strip() for c in self.class_names.split(",")] if self.class_names else None,
        }

    def options(self, path: Path | None = None) -> api.ModelOptions:
        from bdaudit import api

        return api.ModelOptions(path, self.overrides(), self.model_config)

    def inputs(self, model: Path | None) -> list[Path | None]:
        """A checkpoint and the config files that describe it (the default sidecar too)."""
        if model is None:
            return [self.model_config]
        return [model, self.model_config, Path(model).with_suffix(".yaml")]


@dataclass(frozen=True)
class GateFlags:
    """The trigger gates of ``scan`` and ``clean``."""

    fail_asr: FailAsr = DEFAULT_FAIL_ASR
    null_margin: NullMargin = DEFAULT_NULL_MARGIN
    family_asr: FamilyAsr = DEFAULT_FAMILY_ASR

    def gates(self) -> Any:
        from bdaudit.detect.probe import Gates

        return Gates(self.fail_asr, self.null_margin, self.family_asr or None)


@dataclass(frozen=True)
class SequelaFlags:
    """The sequela audit's inputs and gates (``sequela``, and ``clean`` unless --no-sequela)."""

    members: Members = None
    reference: Reference = None
    max_mia_auc: MaxMiaAuc = None
    max_reinjection_asr: MaxReinjection = None
    reinjection_steps: ReinjectionSteps = None

    def options(self) -> api.SequelaOptions:
        from bdaudit import api
        from bdaudit.sequela.audit import SequelaGates

        budget = {"budget_steps": self.reinjection_steps} if self.reinjection_steps else None
        return api.SequelaOptions(self.members, self.reference,
                                  SequelaGates(self.max_mia_auc, self.max_reinjection_asr), budget)


def _is_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.cache
def _fields(group: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(group, include_extras=True)
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=f.default)
            for f in dataclasses.fields(group)]


def option_groups(func: Callable[..., Any]) -> Callable[..., Any]:
    """Replace each parameter of ``func`` annotated with a group (``ModelFlags``...) by the group's
    flags in typer's view of the signature, and call ``func`` with the group objects. A command with
    ``ctx`` and ``config`` parameters first gets ``--config`` (or the policy file) merged into its
    flags (``merge_config``), so its body sees the final values as plain typed arguments."""
    signature = inspect.signature(func, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items() if _is_group(p.annotation)}
    params: list[inspect.Parameter] = []
    for name, param in signature.parameters.items():
        if name in groups:
            params += _fields(groups[name])
        else:
            params.append(param)
    # typer wants plain keyword parameters in declaration order; none of them is positional-only.
    params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "ctx" in kwargs and "config" in kwargs:
            from bdaudit.cli.app import merge_config

            kwargs = {"ctx": kwargs["ctx"], **merge_config(kwargs["ctx"], kwargs["config"], kwargs)}
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)
                                    if f.name in kwargs})
        return func(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper

