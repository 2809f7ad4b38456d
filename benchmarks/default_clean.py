"""The issue-4 acceptance run: `bdaudit clean` exactly as a user runs it (default method, default
trigger library, default unlearning) on every backdoored sample with the shipped clean subset
(400 images = 10 % of the samples' training set), beside conventional fine-tuning with the same
data and epochs. Appends JSON lines to results/default_clean.jsonl and prints a Markdown table.
Usage: python benchmarks/default_clean.py [--models ...] [--runs default ft ft_unlearn]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import DATA, ROOT, SAMPLES, manifest

from bdaudit import api
from bdaudit.core.defaults import DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION

MODELS = ["badnets", "blended", "wanet", "lowfreq", "trojannn", "input_aware", "badencoder"]
# label -> (method, unlearn_fraction)
RUNS = {"default": (DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION), "ft": ("ft", 0.0),
        "ft_unlearn": ("ft", DEFAULT_UNLEARN_FRACTION), "default_no_unlearn": (DEFAULT_METHOD, 0.0)}


def run(model: str, label: str) -> dict[str, Any]:
    method, fraction = RUNS[label]
    planted = manifest()[model]["trigger"]
    report = api.clean(SAMPLES / f"{model}.safetensors", api.DataOptions(DATA / "clean", DATA / "eval"),
                       api.CleanOptions(method, unlearn_fraction=fraction), runtime=api.Runtime("cpu", 256, 0))
    clean = report.sections["clean"]
    before = {t["trigger"]: t for t in clean["before"]["triggers"] if not t["error"]}
    after = {t["trigger"]: t for t in clean["after"]["triggers"] if not t["error"]}
    return {
        "model": model, "run": label, "method": method, "unlearn_fraction": fraction,
        "ca_before": clean["before"]["clean_accuracy"], "ca_after": clean["after"]["clean_accuracy"],
        "asr_before": before[planted]["asr"], "asr_after": after[planted]["asr"],
        "flagged_before": [t for t, r in before.items() if r["flagged"]],
        "flagged_after": [t for t, r in after.items() if r["flagged"]],
        "max_asr_after": max(r["asr"] for r in after.values()),
        "unlearned": (clean["hyperparameters"].get("unlearning") or {}).get("triggers", []),
        "verdict": report.to_dict()["verdict"]["status"], "seconds": round(clean["seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--runs", nargs="*", default=["default", "ft"], choices=sorted(RUNS))
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "default_clean.jsonl"
    rows = []
    for model in args.models:
        for label in args.runs:
            row = run(model, label)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    print("| sample | run | CA before → after | drop | planted ASR before → after | flagged after | verdict | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['run']} | {r['ca_before']:.1%} → {r['ca_after']:.1%} | "
              f"{(r['ca_before'] - r['ca_after']) * 100:.1f} | {r['asr_before']:.1%} → {r['asr_after']:.1%} | "
              f"{', '.join(r['flagged_after']) or '—'} | {r['verdict']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
