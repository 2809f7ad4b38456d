"""Per-family detector summary on the blind benchmark's models and the samples, under any ``DetectSettings``.

For trying a detector setting against every cached blind model (``blind.py`` and ``blind_rgb.py``
plant them; ``--suite``) and, with the MNIST suite, the three shipped samples, at one scan seed:
flagged classes, each family's flags and largest anomaly index, the patch family's compact-patch
shares, seconds. Compare two runs' lines to see what a setting
changes before spending a full ``blind.py`` run on it.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/detect_families.py --set steps=30 --seed 1 > steps30.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/detect_families.py --suite rgb   # the colour suite
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from blind import MNIST, user_flags  # noqa: E402
from blind_rgb import SUITES  # noqa: E402

from bdaudit.core.data import resolve_data  # noqa: E402
from bdaudit.detect.unknown import DetectSettings, detect_unknown  # noqa: E402
from bdaudit.models.checkpoint import load_model  # noqa: E402

SAMPLES = ("clean", "badnets", "encoder_clean")


def summary(path: Path, flags: dict | None, data: Path, seed: int, settings: DetectSettings) -> dict:
    loaded = load_model(path, flags)
    split = resolve_data(data, loaded.config, 0.2, seed)  # the tuning part, as scan's detector sees it
    started = time.perf_counter()
    result = detect_unknown(loaded.classifier(), split.tune, seed=seed, settings=settings).to_dict()
    families = {}
    for fam in result["families"]:
        rows = fam["classes"]
        index = [r["anomaly_index"] for r in rows if r.get("anomaly_index") is not None]
        families[fam["family"]] = {"flagged": [r["class"] for r in rows if r["flagged"]],
                                   "top_index": round(max(index), 2) if index else None,
                                   **({"compact": {r["class"]: r["compact_asr"] for r in rows if "compact_asr" in r}}
                                      if fam["family"] == "patch" else {}),
                                   "seconds": fam["seconds"]}
    return {"flagged": result["flagged"], "seconds": round(time.perf_counter() - started, 1), **families}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DetectSettings fields")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="model names (blind models or samples)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="mnist",
                        help="which blind suite's models (the samples come with mnist)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = DetectSettings(**{k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)})
    suite = SUITES[args.suite]
    entries = [(name, suite.cache / f"{name}.safetensors", user_flags(arch), suite.data / "clean")
               for name, _, _, arch, _ in suite.models]
    if args.suite == "mnist":
        entries += [(f"sample:{s}", ROOT / "sample_models" / f"{s}.safetensors", None, MNIST / "clean")
                    for s in SAMPLES]
    for name, path, flags, data in entries:
        if args.only and name not in args.only:
            continue
        if not path.exists():
            print(f"skipped {name}: {path} is missing (run benchmarks/blind.py first)", file=sys.stderr)
            continue
        print(json.dumps({"model": name, "seed": args.seed, **summary(path, flags, data, args.seed, settings)}),
              flush=True)


if __name__ == "__main__":
    main()
