"""The typer app, shared options and the error/exit-code policy.

Exit codes: 0 passed, 1 a gate failed, 2 bad input or usage, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from bdaudit.errors import BdauditError
from bdaudit.report import Report

EXIT_PASS, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(name="bdaudit", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Audit image classifiers for backdoors and remove them by super-fine-tuning.")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> typer.Exit:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def guarded(func: F) -> F:
    """One line per error with the documented exit code; a traceback only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BdauditError as exc:
            if debug:
                raise
            raise fail(str(exc), EXIT_USAGE) from None
        except KeyboardInterrupt:
            raise fail("interrupted; no output was written", EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence maps to exit 3
            if debug:
                raise
            raise fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
                       "a traceback and report it)", EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


# Options shared by several commands: declared once so every command spells them the same way.
ModelPath = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors or a PyTorch state dict.",
                                           show_default=False)]
DataDir = Annotated[Path, typer.Option("--data", "-d", help="Clean labelled images, DIR/<class>/*.",
                                       show_default=False)]
EvalDir = Annotated[Path | None, typer.Option("--eval-data", help="Separate held-out images "
                                              "(then all of --data is for tuning).")]
Holdout = Annotated[float, typer.Option(help="Share of --data held out for evaluation.")]
Arch = Annotated[str | None, typer.Option(help="timm model name or module:callable.",
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
Seed = Annotated[int, typer.Option(help="Seed for every random choice.", rich_help_panel="Runtime")]
JsonOut = Annotated[str | None, typer.Option("--json", help="Write the JSON report here (- for stdout).",
                                             rich_help_panel="Output")]
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


def parse_settings(items: list[str] | dict[str, Any] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings (or a YAML mapping) to a dict; the method's settings types coerce values."""
    if isinstance(items, dict):
        return {str(k).replace("-", "_"): v for k, v in items.items()}
    settings: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BdauditError(f"{flag} takes KEY=VALUE, not '{item}'")
        settings[key.strip().replace("-", "_")] = value.strip()
    return settings


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BdauditError(f"{flag} must be comma-separated numbers, not '{text}'") from None


def model_flags(arch: str | None, num_classes: int | None, in_chans: int | None,
                input_size: str | None, mean: str | None, std: str | None,
                class_names: str | None) -> dict[str, Any]:
    """Model-config overrides from flags (highest precedence)."""
    size = _floats(input_size, "--input-size")
    return {
        "arch": arch, "num_classes": num_classes, "in_chans": in_chans,
        "input_size": [int(v) for v in size] if size else None,
        "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"),
        "class_names": [c.strip() for c in class_names.split(",")] if class_names else None,
    }


def consoles(json_out: str | None, quiet: bool) -> tuple[Console, bool]:
    """Tables go to stderr when stdout carries JSON; returns (console, show_tables)."""
    console = Console(stderr=json_out == "-", highlight=False)
    return console, not quiet


def merge_config(ctx: typer.Context, config: Path | None, values: dict[str, Any]) -> dict[str, Any]:
    """``--config FILE.yaml``: its keys (flag names) fill every flag not given on the command
    line; a flag typed explicitly wins."""
    if config is None:
        return values
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BdauditError(f"cannot read --config {config}: {exc}") from None
    if not isinstance(loaded, dict):
        raise BdauditError(f"--config {config} must be a YAML mapping of flag names to values")
    merged = dict(values)
    for raw_key, value in loaded.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        key = "set_" if key == "set" else key  # `set:` holds method settings (a mapping or KEY=VALUE list)
        if key not in values or key in ("config", "model"):
            raise BdauditError(f"--config {config}: '{raw_key}' is not a flag of this command")
        # Compared by name: typer may ship its own copy of click's ParameterSource enum.
        if getattr(ctx.get_parameter_source(key), "name", "DEFAULT") in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged


def finish(report: Report, json_out: str | None, console: Console, show: bool) -> None:
    """Write the JSON report, print it for people, and exit 1 if a gate failed."""
    from bdaudit.render import render_report

    if json_out:
        report.write_json(json_out)
    if show:
        render_report(report, console)
    elif not report.passed:
        console.print("FAIL: " + "; ".join(report.reasons))
    if not report.passed:
        raise typer.Exit(EXIT_GATE)
