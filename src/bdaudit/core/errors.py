"""Error types that map to the CLI's documented exit codes."""

from __future__ import annotations


class BdauditError(Exception):
    """Bad input or usage: the message names the problem and the fix (exit code 2)."""


class CheckpointError(BdauditError):
    """A checkpoint cannot be loaded safely or does not match its architecture."""


class DataError(BdauditError):
    """The clean data folder is unusable."""


class TriggerError(BdauditError):
    """A trigger specification is invalid."""


def missing_model(path: object) -> CheckpointError:
    return CheckpointError(f"model file {path} does not exist")


def missing_data(path: object) -> DataError:
    return DataError(f"data folder {path} does not exist; give a folder laid out as DIR/<class>/<image files>")


def summarize(items: list[str], first: int = 5) -> str:
    """'a, b, c (+7 more)' — the first few offenders and a count."""
    shown = ", ".join(items[:first])
    rest = len(items) - first
    return f"{shown} (+{rest} more)" if rest > 0 else shown
