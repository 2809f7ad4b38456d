"""The typer app, shared options and the error/exit-code policy.

Exit codes: 0 passed, 1 a gate failed, 2 bad input or usage, 3 internal error, 130 interrupted,
143 terminated (SIGTERM). Every error is one ``error:`` line printed verbatim (never as markup).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_exceptions
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
    from click.globals import get_current_context  # type: ignore[no-redef]

from bdaudit.cli.entry import EXIT_INTERRUPTED, interrupted_exit_code, main  # noqa: F401  (main: entry point)
from bdaudit.core.errors import BdauditError, missing_data, missing_model
from bdaudit.core.outputs import check_outputs, output_transaction

if TYPE_CHECKING:
    from bdaudit.report.document import Report

EXIT_PASS, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_TERMINATED = 143


def one_line(message: str) -> str:
    """Multi-line messages (YAML parser errors, wrapped exceptions) joined into one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr; MESSAGE is plain text, so paths like ``in/no[/]pe`` print as is."""
    text = Text.assemble(("error:", "bold red"), " ", one_line(message))
    try:
        Console(stderr=True, highlight=False).print(text, soft_wrap=True)
    except Exception:  # noqa: BLE001 - the printer of last resort must not fail itself
        sys.stderr.write(f"error: {one_line(message)}\n")


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, missing argument, bad value) as one ``error:`` line, not
    click/typer's framed usage box."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(EXIT_USAGE)
        except click_exceptions.ClickException as exc:
            hint = ""
            if isinstance(exc, click_exceptions.UsageError) and exc.ctx is not None:
                hint = f"; see '{exc.ctx.command_path} --help'"
            print_error(exc.format_message().rstrip(".") + hint)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            print_error("interrupted; no output was written")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else EXIT_PASS)


app = typer.Typer(name="bdaudit", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, cls=OneLineErrors,
                  help="Audit image classifiers for backdoors and remove them by fine-tuning (FT-SAM plus "
                       "trigger unlearning by default).")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> typer.Exit:
    print_error(message)
    return typer.Exit(code)


# Library errors name option fields in backticks ("`phase1_fraction` must be in (0, 1]"); the CLI
# user is shown the flag that sets the field. The flags come from the commands' own parameters
# (the running command's first); only option fields named differently from their flag are listed.
FIELD_ALIASES = {"eval_path": "eval_data", "triggers": "trigger"}
_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def field_flags() -> dict[str, str]:
    """Parameter name -> its long flag, over every command, the running command's winning."""
    commands = list(getattr(typer.main.get_command(app), "commands", {}).values())
    current = get_current_context(silent=True)
    if current is not None:
        commands.append(current.command)  # last: its flags win
    flags: dict[str, str] = {}
    for command in commands:
        for param in command.params:
            longs = [opt for opt in param.opts if opt.startswith("--")]
            if param.name and longs:
                flags[param.name] = longs[0]
    return flags


def with_flags(message: str) -> str:
    """A library message for the CLI user: each backticked field that a flag sets becomes that
    flag; other backticked names (method settings given with --set KEY=VALUE) stay as written."""
    if "`" not in message:
        return message
    flags = field_flags()
    return _FIELD.sub(lambda m: flags.get(FIELD_ALIASES.get(m[1], m[1]), m[0]), message)


def guard_outputs(outputs: Iterable[tuple[str, str | Path | None]], inputs: Iterable[str | Path | None]) -> None:
    """Before any work: refuse outputs that are inputs (or each other) or cannot be written.
    Every command passes ALL its output flags and ALL its input paths (see ``bdaudit.core.outputs``)."""
    check_outputs(outputs, inputs)


def require_inputs(models: list[Path], folders: Iterable[Path | None]) -> None:
    """Fail fast, before the heavy imports, on a missing model or data folder (the loaders say the
    same later). With several models a missing one is reported in the summary instead."""
    if len(models) == 1 and not str(models[0]).startswith("hf-hub:") and not Path(models[0]).exists():
        raise missing_model(models[0])
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise missing_data(folder)


def model_inputs(model: Path | None, model_config: Path | None) -> list[Path | None]:
    """A checkpoint and the config files that describe it (the default sidecar too)."""
    if model is None:
        return [model_config]
    return [model, model_config, Path(model).with_suffix(".yaml")]


def trigger_inputs(specs: Iterable[str] | None) -> list[Path]:
    """Files a ``--trigger`` spec reads (``custom:image=...,mask=...``): inputs too."""
    found = []
    for spec in specs or ():
        for item in spec.partition(":")[2].split(","):
            key, sep, value = item.partition("=")
            if sep and key.strip() in ("image", "mask") and value.strip():
                found.append(Path(value.strip()))
    return found


def guarded(func: F | None = None, *, rollback: bool = True) -> Any:
    """One line per error with the documented exit code; a traceback only with --debug.

    The command runs inside an output transaction: when it ends with an error or an interrupt
    (any exit code but 0 and 1), every file it wrote is rolled back. ``rollback=False`` keeps
    them (bench: its planted models and cell cache are what resuming is for).
    """
    if func is None:
        return functools.partial(guarded, rollback=rollback)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            with output_transaction() as txn:
                try:
                    result = func(*args, **kwargs)
                except typer.Exit as exc:
                    if exc.exit_code in (EXIT_PASS, EXIT_GATE) or not rollback:
                        txn.commit()  # a finished verdict (or a resumable bench) keeps its outputs
                    raise
                except BaseException:
                    if not rollback:
                        txn.commit()
                    raise
                txn.commit()
                return result
        except typer.Exit:
            raise
        except BdauditError as exc:
            if debug:
                raise
            raise fail(with_flags(str(exc)), EXIT_USAGE) from None
        except KeyboardInterrupt as exc:
            word = "terminated" if interrupted_exit_code(exc) == EXIT_TERMINATED else "interrupted"
            raise fail(f"{word}; no output was written" if rollback else f"{word}; rerun to resume",
                       interrupted_exit_code(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence maps to exit 3
            if debug:
                raise
            raise fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
                       "a traceback and report it)", EXIT_INTERNAL) from None

    return wrapper


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


def consoles(json_out: str | None, quiet: bool) -> tuple[Console, bool]:
    """Tables go to stderr when stdout carries JSON; returns (console, show_tables)."""
    console = Console(stderr=json_out == "-", highlight=False)
    return console, not quiet


def _flag_value(ctx: typer.Context, key: str, value: Any, raw_key: Any, config: Path) -> Any:
    """A --config value converted and checked as if it had been typed as that flag."""
    if key == "set_":
        if isinstance(value, dict | list):
            return value
        raise BdauditError(f"--config {config}: 'set' must be a mapping of setting names to values or a "
                           f"list of KEY=VALUE, not {type(value).__name__}")
    param = next((p for p in ctx.command.params if p.name == key), None)
    if param is None or value is None:
        return value
    if param.multiple and not isinstance(value, list):
        value = [value]
    if isinstance(value, dict) or (isinstance(value, list) and not param.multiple):
        raise BdauditError(f"--config {config}: '{raw_key}' takes a single value, not a "
                           f"{type(value).__name__}")
    if isinstance(value, bool) and not getattr(param, "is_bool_flag", False):
        raise BdauditError(f"--config {config}: '{raw_key}' takes a value, not true/false")
    try:
        return param.process_value(ctx, value)
    except (click_exceptions.ClickException, TypeError, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, click_exceptions.ClickException) else str(exc)
        raise BdauditError(f"--config {config}: '{raw_key}': {message}") from None


POLICY_FILE = "bdaudit.yaml"


def _read_yaml_mapping(path: Path, flag: str) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise BdauditError(f"cannot read {flag} {path}: {one_line(str(exc))}") from None
    except yaml.YAMLError as exc:
        raise BdauditError(f"{flag} {path} is not valid YAML ({one_line(str(exc))}); fix the file") from None
    if not isinstance(loaded, dict):
        raise BdauditError(f"{flag} {path} must be a YAML mapping of flag names to values")
    return loaded


def _all_flag_names(ctx: typer.Context, values: dict[str, Any]) -> set[str]:
    """Flags of every command: one policy file serves scan and clean alike."""
    group = getattr(ctx.parent, "command", None)
    commands = getattr(group, "commands", None) or {}
    return {p.name for command in commands.values() for p in command.params if p.name} | set(values)


def merge_config(ctx: typer.Context, config: Path | None, values: dict[str, Any]) -> dict[str, Any]:
    """``--config FILE.yaml``, else ``./bdaudit.yaml`` (the policy file) if present: its keys (flag
    names) fill every flag not given on the command line; a flag typed explicitly wins. An explicit
    --config names this command's flags only; the policy file may also hold other commands' flags
    (skipped here), but a key that is no command's flag is an error, never silently ignored."""
    policy = config is None
    if policy:
        if not Path(POLICY_FILE).is_file():
            return values
        config = Path(POLICY_FILE)
    flag = "policy file" if policy else "--config"
    loaded = _read_yaml_mapping(config, flag)
    known = _all_flag_names(ctx, values) if policy else set(values)
    merged = dict(values)
    for raw_key, value in loaded.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        key = "set_" if key == "set" else key  # `set:` holds method settings (a mapping or KEY=VALUE list)
        if key not in known or key in ("config", "model", "ctx"):
            raise BdauditError(f"{flag} {config}: '{raw_key}' is not a flag of "
                               f"{'any command' if policy else 'this command'}")
        if key not in values:
            continue  # another command's flag in the shared policy file
        # Compared by name: typer may ship its own copy of click's ParameterSource enum.
        if getattr(ctx.get_parameter_source(key), "name", "DEFAULT") in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = _flag_value(ctx, key, value, raw_key, config)
    return merged


def finish(report: Report, json_out: str | None, console: Console, show: bool,
           sarif_out: Path | None = None, html_out: Path | None = None) -> None:
    """Write the JSON/SARIF/HTML reports, print it for people, and exit 1 if a gate failed."""
    from bdaudit.report.render import render_report

    write_reports(report, json_out, sarif_out, html_out)
    if show:
        render_report(report, console)
    else:  # -q: still one verdict line, so a CI log says what happened
        console.print(verdict_line(report), soft_wrap=True, markup=False)
    if not report.passed:
        raise typer.Exit(EXIT_GATE)


def verdict_line(report: Report) -> str:
    return f"PASS in {report.wall_time_s:.1f}s" if report.passed else "FAIL: " + "; ".join(report.reasons)


def write_reports(report: Report, json_out: str | None, sarif_out: Path | None = None,
                  html_out: Path | None = None) -> None:
    """Every report file a command writes, through one atomic writer (``bdaudit.core.outputs``)."""
    if json_out:
        report.write_json(json_out)
    if sarif_out is not None or html_out is not None:
        write_rendered(report.to_dict(), sarif_out, html_out, artifacts=report.artifacts,
                       exit_code=EXIT_PASS if report.passed else EXIT_GATE)


def write_rendered(payload: dict[str, Any], sarif_out: Path | None, html_out: Path | None,
                   artifacts: dict[str, Any] | None = None, exit_code: int | None = None) -> None:
    import json

    from bdaudit.core.outputs import write_output

    if sarif_out is not None:
        from bdaudit.report.sarif import to_sarif

        write_output(sarif_out, json.dumps(to_sarif(payload, exit_code=exit_code), indent=2) + "\n")
    if html_out is not None:
        from bdaudit.report.html import to_html

        write_output(html_out, to_html(payload, artifacts))
