"""Re-scan the blind benchmark's planted models with the current default detector (scan only).

`blind.py` plants, scans and cleans (~25 min); after a detector change this re-runs only the default
`api.scan` on the models it cached, as a user would, at one or more scan seeds (`--seed`: how much a
verdict depends on the detector's random draws), and appends one line per model and seed to
results/blind_rescan.jsonl: detected classes, the scan's verdict and seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_rescan.py [--only NAME ...] [--seeds 1 2] [--suite rgb]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # blind_arch: the third-party tutorial net

import blind_rgb  # noqa: E402
from blind import TARGET, user_flags  # noqa: E402
from common import emit  # noqa: E402

from bdaudit import api  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "blind_rescan.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all cached)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="scan seeds (default: 0, a user's)")
    parser.add_argument("--suite", choices=tuple(blind_rgb.SUITES), default="mnist",
                        help="rgb: blind_rgb.py's planted colour models (-> results/blind_rgb_rescan.jsonl)")
    args = parser.parse_args()
    suite = blind_rgb.SUITES[args.suite]
    results = RESULTS if args.suite == "mnist" else RESULTS.with_name("blind_rgb_rescan.jsonl")
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    for seed in args.seeds:
        for entry in suite.models:
            name, path = entry[0], suite.cache / f"{entry[0]}.safetensors"
            if (args.only and name not in args.only) or not path.exists():
                continue
            started = time.perf_counter()
            report = api.scan(api.ModelOptions(path, user_flags(entry[3])),
                              api.DataOptions(suite.data / "clean"),
                              runtime=api.Runtime(seed=seed))
            detection = report.sections["detection"]
            flagged = detection["flagged"]
            emit({"model": name, "trigger": entry[1], "seed": seed, "commit": commit, "scan_passed": report.passed,
                  "detected": flagged, "detected_target": bool(entry[1]) and TARGET in flagged,
                  "by_family": {f["family"]: f["flagged"] for f in detection["families"] if f["flagged"]},
                  "detector_seconds": detection["seconds"],
                  "seconds": round(time.perf_counter() - started, 1)}, results)


if __name__ == "__main__":
    main()
