"""The CLI starts light: help and usage errors must not pay for torch (issue 16; timings live in
benchmarks/startup.py, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "torchvision", "matplotlib")
PROBE = """
import runpy, sys
sys.argv = ["bdaudit", *{args!r}]
try:
    runpy.run_module("bdaudit.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("EXIT", code, "HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1].split()
    return int(last[1]), last[3] if len(last) > 3 else "", done.stderr


@pytest.mark.parametrize("args", [("--help",), ("scan", "--help"), ("clean", "--help"), ("bench", "--help")])
def test_help_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    code, heavy, _ = run_cli(*args)
    assert code == 0 and heavy == "", heavy


def test_a_missing_model_is_refused_before_the_heavy_imports(tmp_path: Path) -> None:
    data = tmp_path / "data" / "0"
    data.mkdir(parents=True)
    code, heavy, stderr = run_cli("scan", str(tmp_path / "nope.safetensors"), "--data", str(tmp_path / "data"))
    assert code == 2 and heavy == "", heavy
    assert "nope.safetensors does not exist" in stderr
    code, heavy, stderr = run_cli("clean", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "missing"))
    assert code == 2 and heavy == "" and "nope.pt does not exist" in stderr
