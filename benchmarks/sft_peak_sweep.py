"""SFT peak selection: residual ASR and clean accuracy for fixed phase-1 peaks vs the LR range
test's choice, on every standalone sample model. Appends JSON lines to results/sft_peak_sweep.jsonl.
Usage: python benchmarks/sft_peak_sweep.py [--models badnets blended ...] [--peaks 0.05 0.1 ...]
"""

from __future__ import annotations

import argparse
import json

from common import ROOT, clean_once, manifest

DEFAULT_MODELS = ["badnets", "blended", "wanet", "lowfreq", "trojannn"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--peaks", nargs="*", default=["auto", "0.03", "0.1", "0.3", "1.0"])
    args = parser.parse_args()
    entries = manifest()
    out = ROOT / "benchmarks" / "results" / "sft_peak_sweep.jsonl"
    for model in args.models:
        entry = entries[model]
        for peak in args.peaks:
            settings = {} if peak == "auto" else {"lr_peak1": float(peak)}
            row = clean_once(model, "sft", settings, entry["trigger"], entry["target"])
            row["peak_setting"] = peak
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
