"""Output safety: nothing the user owns is ever overwritten, and a failed command leaves nothing.

Every command that writes files follows two rules, and new output formats (``--sarif``,
``--html``, ...) get them by calling the same two things:

1. ``check_outputs(outputs, inputs)`` before any work: each output path is refused when it is the
   same file as an input (same path, through symlinks, or the same inode: hard links), when it is
   an existing folder, when its folder cannot be written, or when two outputs are one file.
   Inputs may be files or folders (every file under a folder counts, e.g. ``--data``).
2. ``atomic_output(path)`` to write each file: a temp file next to the destination, renamed into
   place only when the block succeeds. Inside an ``OutputTransaction`` (the CLI opens one per
   command, see ``cli.app.guarded``) every output is also recorded, so when any later step of the
   command fails or is interrupted, all its outputs are rolled back: new files are removed and
   files replaced under ``--force`` get their old content back.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bdaudit.core.errors import BdauditError

__all__ = ["OutputTransaction", "atomic_output", "check_outputs", "keep_outputs", "output_transaction",
           "refuse_existing", "write_output"]

_CURRENT: contextvars.ContextVar[OutputTransaction | None] = contextvars.ContextVar("bdaudit_outputs",
                                                                                     default=None)
MAX_INPUT_FILES = 1_000_000  # a bound on the inode walk, so a huge tree cannot stall the check


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _input_files(root: Path) -> Iterator[Path]:
    """``root`` itself, or every file under it (following symlinked folders, once each)."""
    if not root.is_dir():
        yield root
        return
    seen: set[tuple[int, int] | None] = set()
    count = 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        ident = _identity(Path(folder))
        if ident in seen:
            dirs[:] = []
            continue
        seen.add(ident)
        for name in files:
            count += 1
            if count > MAX_INPUT_FILES:
                return
            yield Path(folder) / name


def _writable_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path``; None when something in the way is not a folder."""
    for parent in path.parents:
        if parent.exists():
            return parent if parent.is_dir() else None
    return None


def check_outputs(outputs: Iterable[tuple[str, str | Path | None]],
                  inputs: Iterable[str | Path | None]) -> None:
    """Refuse outputs that would overwrite an input or each other, or that cannot be written.

    ``outputs`` are (flag, path) pairs, e.g. ``[("--out", out), ("--json", json_out)]``; a None path
    or ``-`` (stdout) is skipped. ``inputs`` are paths (files or folders); None entries are skipped.
    """
    try:
        _check_outputs(list(outputs), list(inputs))
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. a NUL byte or a symlink loop in a path
        raise BdauditError(f"cannot use the output/input paths given ({exc}); check them") from None


def _check_outputs(outputs: list[tuple[str, str | Path | None]], inputs: list[str | Path | None]) -> None:
    named = [(flag, Path(p)) for flag, p in outputs if p is not None and str(p) != "-"]
    if not named:
        return
    sources = [Path(p) for p in inputs if p is not None and str(p) != "-"]
    for (flag, path), (other_flag, other) in ((a, b) for i, a in enumerate(named) for b in named[i + 1:]):
        if path.resolve() == other.resolve() or (_identity(path) is not None and _identity(path) == _identity(other)):
            raise BdauditError(f"{flag} {path} and {other_flag} {other} are the same file; give each "
                               "output its own path")
    for flag, path in named:
        if path.is_dir():
            raise BdauditError(f"{flag} {path} is a folder; give a file path")
        parent = _writable_parent(path)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            raise BdauditError(f"{flag} {path} cannot be written (its folder is missing, not a folder or "
                               "read-only); choose a writable location")
    resolved = [path.resolve() for _, path in named]
    existing = {_identity(path): (flag, path) for flag, path in named if _identity(path) is not None}
    for source in sources:
        for (flag, path), target in zip(named, resolved, strict=True):
            if target == source.resolve() or (source.is_dir() and target.is_relative_to(source.resolve())
                                              and target.exists()):
                raise BdauditError(f"{flag} {path} is an input ({source}); bdaudit never overwrites its "
                                   "inputs, choose another path")
        if not existing:
            continue
        for file in _input_files(source):
            hit = existing.get(_identity(file))
            if hit is not None:
                raise BdauditError(f"{hit[0]} {hit[1]} is the same file as the input {file}; bdaudit "
                                   "never overwrites its inputs, choose another path")


@dataclass
class OutputTransaction:
    """The outputs one command wrote, so that a failure can take them all back."""

    written: list[tuple[Path, Path | None]] = field(default_factory=list)  # (destination, backup)

    def record(self, destination: Path, backup: Path | None) -> None:
        self.written.append((destination, backup))

    def commit(self) -> None:
        """Keep every output: drop the backups of replaced files."""
        for _, backup in self.written:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self.written.clear()

    def rollback(self) -> None:
        """Remove every output written, restoring files that ``--force`` replaced."""
        for destination, backup in reversed(self.written):
            try:
                if backup is not None:
                    os.replace(backup, destination)
                else:
                    destination.unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the others must still be undone
        self.written.clear()


@contextmanager
def output_transaction() -> Iterator[OutputTransaction]:
    """Outputs written inside the block are rolled back if the block raises (anything, including
    KeyboardInterrupt); the caller may also ``rollback()`` explicitly (e.g. on exit code 2)."""
    txn = OutputTransaction()
    token = _CURRENT.set(txn)
    try:
        yield txn
    except BaseException:
        txn.rollback()
        raise
    finally:
        _CURRENT.reset(token)


def keep_outputs() -> None:
    """Commit what the current command has written so far: it is a finished result even if the
    command's exit code will be 2 (e.g. a batch whose summary reports one model that did not load)."""
    txn = _CURRENT.get()
    if txn is not None:
        txn.commit()


def _backup(path: Path) -> Path:
    """A hard link (or copy) of ``path`` beside it, so a replaced file can be restored."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=path.parent)
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def refuse_existing(path: str | Path, force: bool) -> None:
    """An existing output is replaced only with ``force``: called before any work, so a long run
    does not fail at its very end."""
    if Path(path).exists() and not force:
        raise BdauditError(f"output {path} already exists; choose another path or pass `force`")


@contextmanager
def atomic_output(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    refuse_existing(path, force)
    if path.is_dir():
        raise BdauditError(f"output {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise BdauditError(f"cannot write output {path} ({exc.strerror or exc}); choose a writable "
                           "location") from None
    os.close(fd)
    tmp = Path(tmp_name)
    txn = _CURRENT.get()
    try:
        yield tmp
        # mkstemp creates 0600; give the output the permissions any new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        backup = _backup(path) if txn is not None and path.exists() else None
        try:
            os.replace(tmp, path)
        except BaseException:
            if backup is not None:
                backup.unlink(missing_ok=True)
            raise
        if txn is not None:
            txn.record(path, backup)
    except OSError as exc:
        raise BdauditError(f"cannot write output {path} ({exc.strerror or exc}); choose a writable "
                           "location with free space") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_output(destination: str | Path, content: str | bytes, force: bool = True) -> Path:
    """Write ``content`` atomically (a reader never sees a half-written report), inside the
    command's output transaction."""
    path = Path(destination)
    with atomic_output(path, force=force) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return path
