"""How much the patch family's verdict depends on the scan seed, on the blind benchmark's models.

For each model (planted and cached by ``blind.py``) and scan seed, the scan's own tuning split for
that seed goes through the default patch family alone (``detect_unknown`` with
``families=("patch",)``, every nomination tested: ``confirm_all``); one line per model and seed: the
flagged classes and every compact-patch share (``compact_asr``), its mean confidence and its place. A
backdoor's target should be confirmed (``patch.confirms``: share >= 0.9) at every seed and a clean
model's classes never. ``encoder_clean`` is the shipped clean encoder sample, scanned on the shipped
clean folder (a weak model with a strong natural class 8).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/patch_seeds.py [--only NAME ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blind import CACHE, MNIST, MODELS, plant, user_flags  # noqa: E402
from common import emit  # noqa: E402

from bdaudit.core.data import resolve_data  # noqa: E402
from bdaudit.detect.unknown import DetectSettings, detect_unknown  # noqa: E402
from bdaudit.models.checkpoint import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "patch_seeds.jsonl"
DEFAULT = ["small_clean_s0", "small_clean_s1", "small_clean_s2", "net_clean_s0", "small_patch_dot_10",
           "small_patch_cross_1", "small_patch_cross_10", "net_patch_checker_1", "net_patch_grey_10", "encoder_clean"]
SAMPLE = ROOT / "sample_models" / "encoder_clean.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=DEFAULT)
    parser.add_argument("--seeds", nargs="*", type=int, default=list(range(6)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    entries = {m[0]: m for m in MODELS}
    for name in args.only:
        entry = entries.get(name, (name, None))
        if name == "encoder_clean":
            loaded = load_model(SAMPLE)
        else:
            plant(*entry)
            loaded = load_model(CACHE / f"{name}.safetensors", user_flags(entry[3]))
        for seed in args.seeds:
            split = resolve_data(MNIST / "clean", loaded.config, 0.2, seed)
            result = detect_unknown(loaded.classifier(), split.tune, seed=seed,
                                    settings=DetectSettings(families=("patch",), confirm_all=True)).to_dict()
            rows = [r for r in result["families"][0]["classes"] if "compact_asr" in r]
            emit({"model": name, "trigger": entry[1], "seed": seed, "commit": commit, "flagged": result["flagged"],
                  "compact": {r["class"]: r["compact_asr"] for r in rows},
                  "confidence": {r["class"]: r["compact_confidence"] for r in rows},
                  "where": {r["class"]: r["compact_patch"] for r in rows}}, RESULTS)


if __name__ == "__main__":
    main()
