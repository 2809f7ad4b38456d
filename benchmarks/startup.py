"""Start-up cost of the CLI as a user pays it: wall time of whole processes, median of N runs.

Measures `bdaudit --help`, `bdaudit scan --help` and an exit-2 bad-input error (a model file that does not
exist), each as a fresh `python -m bdaudit.cli` process, and the modules a `--help` run imports.
Targets (issue 16): `--help` <= 1.0 s, the bad-input error <= 1.5 s, on the 2-core CPU.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--out benchmarks/results/startup.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "--help": ["--help"],
    "scan --help": ["scan", "--help"],
    "bad input (exit 2)": ["scan", "no-such-model.safetensors", "--data", str(ROOT / "sample_data/mnist/eval")],
}


def wall(args: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bdaudit.cli", *args], capture_output=True, cwd=ROOT)
    return time.perf_counter() - started, done.returncode


def heavy_modules() -> list[str]:
    """Which of the heavy libraries a `--help` process imports (none is the goal)."""
    probe = ("import sys, runpy; sys.argv = ['bdaudit', '--help']\n"
             "try:\n    runpy.run_module('bdaudit.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(','.join(m for m in ('torch', 'timm', 'torchvision', 'matplotlib', 'jsonschema') "
             "if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return [m for m in line.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    wall(["--help"])  # warm the OS file cache once, as any second invocation would be
    rows = []
    for name, argv in CASES.items():
        times, codes = zip(*(wall(argv) for _ in range(args.runs)), strict=True)
        rows.append({"case": name, "median_s": round(statistics.median(times), 3),
                     "min_s": round(min(times), 3), "exit_codes": sorted(set(codes)), "runs": args.runs})
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, Python {platform.python_version()}",
              "heavy_imports_on_help": heavy_modules(), "cases": rows}
    for row in rows:
        print(f"{row['case']:<22} median {row['median_s']:.2f} s  (min {row['min_s']:.2f} s, exit {row['exit_codes']})")
    print("heavy modules imported by --help:", ", ".join(record["heavy_imports_on_help"]) or "none")
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
