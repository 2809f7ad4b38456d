"""How large the patch family's compact patch should be: its success per side, on the blind models.

For each blind-benchmark model (planted by ``blind.py``, cached) and seed, the scan's own tuning
split goes through the patch family exactly as ``scan`` runs it; every nominated class then gets a
compact patch of side 6, 7 and 8 (``families.patch.compact_patch``). A backdoor's target should
reach a high share at the chosen side, a clean model's classes a low one.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compact_sweep.py   # -> results/compact_sweep.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blind import CACHE, MNIST, MODELS, TARGET, plant, user_flags  # noqa: E402
from common import emit  # noqa: E402

from bdaudit.core.data import resolve_data  # noqa: E402
from bdaudit.detect.families import FamilyJob, score_inverted  # noqa: E402
from bdaudit.detect.families.patch import PatchFamily, compact_patch  # noqa: E402
from bdaudit.detect.unknown import DetectSettings  # noqa: E402
from bdaudit.models.checkpoint import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compact_sweep.jsonl"
DEFAULT = ["net_patch_checker_1", "small_patch_cross_10", "small_patch_cross_1", "small_patch_dot_10",
           "small_clean_s0", "small_clean_s1", "small_clean_s2", "net_clean_s0", "net_clean_s1", "net_clean_s2"]
SIDES = (6, 7, 8)


def sweep(name: str, seed: int) -> dict:
    entry = {m[0]: m for m in MODELS}[name]
    plant(*entry)
    loaded = load_model(CACHE / f"{name}.safetensors", user_flags(entry[3]))
    classifier = loaded.classifier().eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    split = resolve_data(MNIST / "clean", loaded.config, 0.2, seed)
    s = DetectSettings()
    job = FamilyJob(classifier, split.tune, list(range(split.tune.num_classes)), s, s.steps, torch.device("cpu"),
                    torch.Generator().manual_seed(seed), seed)
    family = PatchFamily()
    sizes, triggers = family.invert(job)  # the NC masks, as the family's run sees them
    scored = score_inverted(family, job, sizes, triggers, s.patch_threshold, 0.0)
    index = dict(zip(scored.classes, scored.anomaly_index, strict=True))
    nominated = sorted(scored.flagged, key=lambda c: -index[c])[:s.compact_tests]
    rows = [{"class": c, "target": bool(entry[1]) and c == TARGET, "anomaly_index": round(index[c], 3),
             "share": {side: round(compact_patch(job, c, triggers[c].mask, side)[0], 4) for side in SIDES}}
            for c in nominated]
    return {"model": name, "trigger": entry[1], "seed": seed, "nominated": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=DEFAULT)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.only:
        for seed in args.seeds:
            emit(sweep(name, seed), RESULTS)


if __name__ == "__main__":
    main()
