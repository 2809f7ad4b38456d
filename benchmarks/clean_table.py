"""Attack x method (sft, ft) at several clean-data sizes: CA and ASR before/after, seconds.
Clean data: the first N images per class of sample_data/mnist/clean (40/class = 10 % of the
samples' 4,000-image training set, 20/class = 5 %). Appends JSON lines to results/clean_table.jsonl.
Usage: python benchmarks/clean_table.py [--models ...] [--methods sft ft] [--per-class 40 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import DATA, ROOT, clean_once, manifest

MODELS = ["badnets", "blended", "wanet", "lowfreq", "trojannn"]


def subset(per_class: int, root: Path) -> Path:
    dest = root / f"clean{per_class}"
    for class_dir in sorted((DATA / "clean").iterdir()):
        (dest / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, dest / class_dir.name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--methods", nargs="*", default=["sft", "ft"])
    parser.add_argument("--per-class", nargs="*", type=int, default=[40, 20])
    args = parser.parse_args()
    entries = manifest()
    out = ROOT / "benchmarks" / "results" / "clean_table.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        for per_class in args.per_class:
            clean_dir = subset(per_class, Path(tmp))
            for model in args.models:
                for method in args.methods:
                    row = clean_once(model, method, {}, entries[model]["trigger"], entries[model]["target"],
                                     clean_dir=clean_dir)
                    row["clean_fraction"] = per_class * 10 / 4000
                    print(json.dumps(row), flush=True)
                    with out.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
