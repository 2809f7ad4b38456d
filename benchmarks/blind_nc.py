"""Neural Cleanse over every class on the blind benchmark's models: the baseline the default detector
must match (issue 12). Runs ``api.scan(model, data, ProbeOptions(detect="off", invert=True))`` —
the library probes plus ``--invert`` — on the same 400 clean images, no trigger or target given.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_nc.py   # -> results/blind_nc.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blind import CACHE, MNIST, TARGET, plant, select, user_flags  # noqa: E402
from common import emit  # noqa: E402

from bdaudit import api  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "blind_nc.jsonl"


def run(entry: tuple) -> dict:
    name, trigger, _, arch, _ = entry
    plant(*entry)
    t0 = time.perf_counter()
    report = api.scan(api.ModelOptions(CACHE / f"{name}.safetensors", user_flags(arch)),
                      api.DataOptions(MNIST / "clean"), api.ProbeOptions(detect="off", invert=True))
    inversion = report.sections["inversion"]
    return {"model": name, "trigger": trigger, "nc_flagged": inversion["flagged"],
            "nc_detected_target": TARGET in inversion["flagged"] if trigger else None,
            "nc_max_index": max((r["anomaly_index"] or 0) for r in inversion["classes"]),
            "scan_exit": 0 if report.passed else 1, "nc_seconds": inversion["seconds"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for entry in select(parser, args.only):
        emit(run(entry), RESULTS)


if __name__ == "__main__":
    main()
