"""Say why a PyTorch pickle was refused, by reading its opcodes without running them.

``torch.load(weights_only=True)`` refuses any global outside its allow-list but only names the
first one. Like the dedicated model scanners (picklescan, fickling, ModelScan) this walks the
pickle with :mod:`pickletools` -- which decodes opcodes and never imports or calls anything -- and
lists every global the file would import, split into dangerous ones (code execution, files,
network) and merely custom classes (typically a whole pickled ``nn.Module``).
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from bdaudit.core.errors import summarize

# Modules whose import from a pickle means the file can run code, touch files or the network.
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "runpy", "importlib", "pickle",
    "_pickle", "marshal", "ctypes", "pty", "webbrowser", "code", "codeop", "commands", "popen2",
    "multiprocessing", "asyncio", "requests", "urllib", "http", "ftplib", "smtplib", "telnetlib",
    "tempfile", "pathlib", "glob", "io", "_io", "bdb", "pdb", "timeit", "platform", "signal",
    "threading", "_thread", "types", "functools", "operator", "site", "builtins", "__builtin__",
    "numpy.testing", "torch.hub", "torch.serialization", "torch._dynamo", "torch.jit", "dill",
    "joblib", "cloudpickle", "logging", "shelve", "dbm", "sqlite3", "zipimport", "pip", "setuptools",
})
# builtins that are harmless data constructors; anything else from builtins is dangerous.
SAFE_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "bytes", "list", "dict",
                           "tuple", "int", "float", "bool", "str", "range", "object"})
# Globals a plain state dict or Lightning checkpoint legitimately needs.
SAFE_PREFIXES = ("torch._utils._rebuild", "torch._tensor._rebuild", "torch.nn.parameter.Parameter",
                 "torch.Size", "torch.device", "collections.OrderedDict", "collections.defaultdict",
                 "torch.serialization._get_layout", "torch._utils._", "numpy.core.multiarray._reconstruct",
                 "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "_codecs.encode")
STORAGE = re.compile(r"^torch\.(\w+Storage|storage\.UntypedStorage|\w+)$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str, limit: int = 80) -> str:
    """Names come from an untrusted file: no escape codes, control characters or endless text."""
    clean = _UNPRINTABLE.sub("?", text)
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


@dataclass
class PickleFindings:
    dangerous: list[str] = field(default_factory=list)
    custom: list[str] = field(default_factory=list)
    unreadable: str | None = None

    def explain(self) -> str:
        """One clause for the refusal message: what the file would import and what to do."""
        if self.dangerous:
            return (f"it would import {summarize(self.dangerous, 4)}, "
                    "which can run code on this machine; do not load it anywhere, ask the author for a "
                    ".safetensors file")
        if self.custom:
            return (f"it holds custom classes ({summarize(self.custom, 3)}): this file is a whole pickled "
                    "model (or carries trainer objects); load it in your own trusted code and export "
                    "model.state_dict() with torch.save or safetensors")
        if self.unreadable:
            return f"its pickle could not be read ({self.unreadable})"
        return "it needs objects outside torch's safe list"


def _classify(name: str) -> str:
    if not name.isprintable():  # no real module or class name holds control characters
        return "dangerous"
    module = name.rsplit(".", 1)[0] if "." in name else name
    root = module.split(".")[0]
    if module in ("builtins", "__builtin__"):
        return "safe" if name.rsplit(".", 1)[-1] in SAFE_BUILTINS else "dangerous"
    if name.startswith(SAFE_PREFIXES) or STORAGE.match(name) and root == "torch" and "Storage" in name:
        return "safe"
    if module in DANGEROUS_MODULES or root in DANGEROUS_MODULES:
        return "dangerous"
    if name in ("torch.load", "torch.save", "torch.ops", "numpy.load", "numpy.save"):
        return "dangerous"
    return "custom"


def pickle_globals(data: bytes) -> tuple[list[str], str | None]:
    """Every ``module.name`` the pickle(s) would import, in order, without executing anything.

    A legacy torch file is several pickles in a row followed by raw storage bytes, so reading goes
    on after each STOP and ends quietly at the first undecodable byte once one pickle was read."""
    found: list[str] = []
    stream = io.BytesIO(data)
    complete = 0
    while stream.tell() < len(data):
        strings: list[str] = []  # STACK_GLOBAL takes module and name from the two latest strings
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    found.append(f"{module}.{name}")
                elif opcode.name == "STACK_GLOBAL":
                    found.append(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<computed global>")
                elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8",
                                     "SHORT_BINSTRING", "BINSTRING", "STRING"):
                    strings.append(str(arg))
        except Exception as exc:  # noqa: BLE001 - a malformed pickle is a finding, not a crash
            if complete:
                break
            return found, f"{type(exc).__name__}: {printable(str(exc), 60)}"
        complete += 1
    return found, None


def _pickles_in(path: Path) -> list[bytes]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def scan_pickle_file(path: Path) -> PickleFindings:
    """Findings for a torch file (zip with ``*/data.pkl`` or a legacy pickle stream)."""
    findings = PickleFindings()
    try:
        blobs = _pickles_in(path)
    except (OSError, zipfile.BadZipFile) as exc:
        findings.unreadable = printable(str(exc), 60)
        return findings
    seen: set[str] = set()
    for blob in blobs:
        names, error = pickle_globals(blob)
        findings.unreadable = findings.unreadable or error
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            kind = _classify(name)
            if kind != "safe":
                (findings.dangerous if kind == "dangerous" else findings.custom).append(printable(name))
    return findings
