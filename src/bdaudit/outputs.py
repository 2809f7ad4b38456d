"""The one place reports (JSON, SARIF, HTML) reach the disk, so output-safety policy lives here."""

from __future__ import annotations

from pathlib import Path

from bdaudit.checkpoint import atomic_output


def write_output(destination: str | Path, content: str | bytes, force: bool = True) -> Path:
    """Write ``content`` atomically: a reader never sees a half-written report."""
    path = Path(destination)
    with atomic_output(path, force=force) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return path
