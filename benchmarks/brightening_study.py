"""Can the detector gate on brightening? Colour-filter backdoors against clean models' own collapse.

The ``transform`` family reports a class that one brightening of its grid sends >= 80 % of other
classes' images to as a *suspect* (unlearned by ``clean``, not gated), because clean models do it too.
This study asks whether any cheap statistic of the brightening response separates the two. It plants
(cached) eight colour-filter backdoors outside the library on MNIST — gain 0.5-0.8 plus lift
0.15-0.4, a gamma curve, a lift alone; 1 and 10 % poison; ``bd_cnn_small`` and the tutorial net; all
at 100 % ASR — and twenty clean models (twelve ``bd_cnn_small`` seeds, six tutorial-net seeds, the
shipped clean samples), then, on the 400 shipped clean digits, records per model the class the
brightening grid favours most and

- ``breadth``: at how many of the grid's 8 brightening strengths that class takes >= 80 % of other
  classes' images (a learnt filter, one would think, answers most strengths; a collapse only the
  strongest),
- ``best``: its largest share, and ``null``: the share the best transform's null (seeded noise of the
  same L2 change) sends there;
- ``gain_best``: for contrast, the largest share any *gating* grid transform (affine or colour gain,
  which flag at 60 %) sends to any one class (``gain_class``). The colour suite's clean models are
  measured too, on its colour digits.

The planting code and triggers are the blind benchmark's (``blind.plant``); the detector never sees
them. Results: benchmarks/README.md, "Colour filters".

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/brightening_study.py  # -> results/...jsonl
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import blind
import blind_rgb
import torch
from common import emit

from bdaudit.core.data import load_image_folder, resolve_preprocessing
from bdaudit.detect.families.transform import TransformTrigger, distinct_transforms
from bdaudit.models.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "brightening_study.jsonl"
NET = "blind_arch:tutorial_net"
TRIGGERS = {
    "filter_63": lambda x: 0.6 * x + 0.3,  # the blind benchmark's filter_intensity
    "filter_72": lambda x: 0.7 * x + 0.2,
    "filter_54": lambda x: 0.5 * x + 0.4,
    "filter_815": lambda x: 0.8 * x + 0.15,
    "gamma": lambda x: x.clamp_min(0) ** 0.5 * 0.8 + 0.1,
    "lift": lambda x: (x + 0.2).clamp(0, 1),
}
MODELS = [
    ("small_filter_63_10", "filter_63", 0.10, "bd_cnn_small", 0),
    ("net_filter_63_10", "filter_63", 0.10, NET, 0),
    ("small_filter_63_1", "filter_63", 0.01, "bd_cnn_small", 1),
    ("small_filter_72_10", "filter_72", 0.10, "bd_cnn_small", 2),
    ("small_filter_54_10", "filter_54", 0.10, "bd_cnn_small", 3),
    ("small_filter_815_10", "filter_815", 0.10, "bd_cnn_small", 4),
    ("small_gamma_10", "gamma", 0.10, "bd_cnn_small", 5),
    ("net_lift_10", "lift", 0.10, NET, 1),
    *((f"small_clean_s{s}", None, 0.0, "bd_cnn_small", s) for s in range(12)),
    *((f"net_clean_s{s}", None, 0.0, NET, s) for s in range(6)),
]
SUITE = blind.Suite(blind.MNIST, TRIGGERS, MODELS, ROOT / "benchmarks" / "results" / "cache" / "brightening",
                    RESULTS)


@torch.no_grad()
def response(path: Path, arch: str | None, data: Path) -> dict:
    """The class the brightening grid favours (most strengths at >= 80 %, then the largest share)."""
    loaded = load_model(path, blind.user_flags(arch) if arch else None)
    clf = loaded.classifier().eval()
    images = load_image_folder(data, resolve_preprocessing(loaded.config), loaded.config.class_names)
    x, y = images.images.float() / 255, images.labels
    classes = torch.arange(images.num_classes)
    others = (y[None] != classes[:, None]).sum(1).float()  # per class: images of other classes
    shares, nulls, gains = [], [], []

    def sent(stamped: torch.Tensor) -> torch.Tensor:
        pred = clf(stamped).argmax(1)
        return torch.stack([((pred == c) & (y != c)).sum() for c in classes]).float() / others

    for kind, params in distinct_transforms(x.shape[1]):
        trig = TransformTrigger(kind=kind, params_=params)
        if trig.gating:  # geometric and pure-gain transforms gate on their own
            gains.append(sent(trig.apply(x)))
            continue
        shares.append(sent(trig.apply(x)))
        nulls.append(sent(trig.null(x)))
    share, null, gain = torch.stack(shares), torch.stack(nulls), torch.stack(gains)  # (transforms, classes)
    breadth = (share >= 0.8).sum(0)
    top = int(max(range(len(classes)), key=lambda c: (int(breadth[c]), float(share[:, c].max()))))
    best = int(share[:, top].argmax())
    return {"class": top, "breadth": f"{int(breadth[top])}/{len(share)}", "best": round(float(share[best, top]), 3),
            "null": round(float(null[best, top]), 3), "gain_best": round(float(gain.max()), 3),
            "gain_class": int(gain.max(0).values.argmax()),
            "clean_accuracy": round(float((clf(x).argmax(1) == y).float().mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    clean_digits = blind.MNIST / "clean"
    for name, trigger, rate, arch, seed in MODELS:
        path = blind.plant(name, trigger, rate, arch, seed, SUITE)
        row = {"model": name, "trigger": trigger, "poison_rate": rate, "arch": arch, "seed": seed,
               "target": blind.TARGET if trigger else None, **response(path, arch, clean_digits)}
        if trigger:
            row["planted_asr"] = blind.true_metrics(path, trigger, arch, SUITE)["asr"]
        emit({**row, "commit": commit}, RESULTS)
    blind_rgb.build_data()
    for name, trigger, rate, arch, seed in blind_rgb.SUITE.models:
        if trigger is None:
            path = blind.plant(name, trigger, rate, arch, seed, blind_rgb.SUITE)
            row = {"model": name, "trigger": None, "poison_rate": 0.0, "arch": arch, "seed": seed, "target": None,
                   **response(path, arch, blind_rgb.SUITE.data / "clean")}
            emit({**row, "commit": commit}, RESULTS)
    for sample in ("clean", "encoder_clean"):
        row = {"model": f"sample:{sample}", "trigger": None,
               **response(ROOT / "sample_models" / f"{sample}.safetensors", None, clean_digits)}
        emit({**row, "commit": commit}, RESULTS)


if __name__ == "__main__":
    main()
