"""Re-scan the blind benchmark's planted models with the current default detector (scan only).

`blind.py` plants, scans and cleans (~45 min); after a detector change this re-runs only the default
`api.scan` on the models it cached, as a user would, and appends one line per model to
results/blind_rescan.jsonl: detected classes, whether the screen was refined, the scan's seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_rescan.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # blind_arch: the third-party tutorial net

from blind import CACHE, MODELS, user_flags  # noqa: E402

from bdaudit import api  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "blind_rescan.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all cached)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    for entry in MODELS:
        name, path = entry[0], CACHE / f"{entry[0]}.safetensors"
        if (args.only and name not in args.only) or not path.exists():
            continue
        started = time.perf_counter()
        report = api.scan(api.ModelOptions(path, user_flags(entry[3])),
                          api.DataOptions(ROOT / "sample_data" / "mnist" / "clean"))
        detection = report.sections["detection"]
        row = {"model": name, "commit": commit, "scan_passed": report.passed, "detected": detection["flagged"],
               "refined": detection.get("refined"), "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
