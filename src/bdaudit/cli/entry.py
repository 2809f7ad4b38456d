"""The process entry point: signals and exit codes that must hold from the first instant.

Only the standard library is imported here, so the handlers are in place before torch loads.
SIGINT exits 130 and SIGTERM 143, each with one line; the first signal unwinds the command (its
outputs are rolled back, see ``bdaudit.core.outputs``) and later ones are ignored until that is done,
so a second Ctrl-C cannot turn a clean exit into a raw signal death or leave a partial file.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C (every ``except KeyboardInterrupt`` cleanup runs) but exit 143."""

    exit_code = EXIT_TERMINATED


_received: list[int] = []


def _ignore_signals() -> None:
    # SIG_IGN, not a Python handler: the interpreter resets Python handlers to the default while
    # it shuts down, and a signal then would still kill the process (exit -2 instead of 130).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _on_signal(signum: int, frame: Any) -> None:
    if _received:
        return  # already unwinding: let the rollback finish
    _received.append(signum)
    _ignore_signals()
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def install_signal_handlers() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def interrupted_exit_code(exc: BaseException) -> int:
    return getattr(exc, "exit_code", EXIT_INTERRUPTED)


def say_interrupted(exc: BaseException) -> None:
    word = "terminated" if isinstance(exc, Terminated) else "interrupted"
    try:
        sys.stderr.write(f"error: {word}; no output was written\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def load_app() -> Any:
    """The typer app with every command registered (the heavy import)."""
    from bdaudit.cli import (  # noqa: F401  (each module registers its commands)
        cmd_bench,
        cmd_clean,
        cmd_info,
        cmd_plant,
        cmd_report,
        cmd_scan,
        cmd_sequela,
    )
    from bdaudit.cli.app import app

    return app


def main() -> None:
    install_signal_handlers()
    try:
        app = load_app()
        app()
    except KeyboardInterrupt as exc:  # outside a command (importing, parsing): nothing was written
        _ignore_signals()
        say_interrupted(exc)
        sys.exit(interrupted_exit_code(exc))
    finally:
        _ignore_signals()  # the outcome is decided and written; teardown must not change the exit code
