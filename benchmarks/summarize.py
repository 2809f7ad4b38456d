"""Print the markdown tables of benchmarks/README.md from results/*.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def clean_table() -> None:
    print("| clean data | attack | method | CA before | CA after | ASR before | ASR after | peak1 | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows("clean_table"):
        peak = f"{r['peak1']:.3f}" if r.get("peak1") else "—"
        print(f"| {r['clean_images']} ({pct(r['clean_fraction'])} %) | {r['model']} | {r['method']} | "
              f"{pct(r['ca_before'])} | {pct(r['ca_after'])} | {pct(r['asr_before'])} | {pct(r['asr_after'])} | "
              f"{peak} | {r['seconds']:.0f} |")


def sweep_table() -> None:
    print("| attack | phase-1 peak | peak used | CA after | ASR after |")
    print("|---|---|---|---|---|")
    for r in rows("sft_peak_sweep"):
        setting = "auto (0.2 x escape)" if r["peak_setting"] == "auto" else r["peak_setting"]
        print(f"| {r['model']} | {setting} | {r['peak1']:.3f} | {pct(r['ca_after'])} | {pct(r['asr_after'])} |")


if __name__ == "__main__":
    sweep_table()
    print()
    clean_table()
