"""What the default unknown-trigger detector costs against Neural Cleanse over every class (issue 12).

For each shipped sample, one in-process default ``scan`` exactly as a user runs it (wall seconds and
the detector's own ``detection.seconds``), then ``scan --invert --detect off`` (Neural Cleanse over
every class, its ``inversion.seconds``), on the same 400 clean images, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/detect_cost.py   # -> results/detect_cost.jsonl
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch
from common import emit

from bdaudit import api

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "detect_cost.jsonl"


def measure(sample: str) -> dict:
    model, data = ROOT / "sample_models" / f"{sample}.safetensors", api.DataOptions(ROOT / "sample_data/mnist/clean")
    t0 = time.perf_counter()
    report = api.scan(model, data)
    wall = time.perf_counter() - t0
    detection = report.sections["detection"]
    t0 = time.perf_counter()
    nc = api.scan(model, data, api.ProbeOptions(detect="off", invert=True))
    nc_wall = time.perf_counter() - t0
    return {"sample": sample, "scan_wall_s": round(wall, 1), "detector_s": detection["seconds"],
            "refined": (detection.get("refined") or {}).get("families"), "flagged": detection["flagged"],
            "scan_passed": report.passed, "nc_wall_s": round(nc_wall, 1),
            "nc_s": nc.sections["inversion"]["seconds"], "nc_flagged": nc.sections["inversion"]["flagged"],
            "detector_over_nc": round(detection["seconds"] / nc.sections["inversion"]["seconds"], 2),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": torch.get_num_threads(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="*", default=["badnets", "clean"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for sample in args.samples:
        emit(measure(sample), RESULTS)


if __name__ == "__main__":
    main()
