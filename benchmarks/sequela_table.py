"""Backdoor sequela per sample attack: membership-inference AUC / TPR@1%FPR on the tuning subset
and re-injection (retuning attack) for the original, SFT-cleaned and FT-cleaned models.
Appends JSON lines to results/sequela_table.jsonl.
Usage: python benchmarks/sequela_table.py [--models badnets ...]
"""

from __future__ import annotations

import argparse
import json

from common import DATA, ROOT, SAMPLES, manifest

from bdaudit.api import DataOptions, Runtime, open_model_and_data
from bdaudit.core.runtime import resolve_device, seed_everything
from bdaudit.defenses import create_defense
from bdaudit.models.checkpoint import load_model
from bdaudit.sequela.audit import audit_sequela, mia_pair
from bdaudit.triggers import parse_trigger
from bdaudit.workflows.clean import DefenseRun, run_defense

MODELS = ["badnets", "blended", "wanet", "lowfreq", "trojannn"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    device = resolve_device("cpu")
    out = ROOT / "benchmarks" / "results" / "sequela_table.jsonl"
    for model in args.models:
        entry = manifest()[model]
        loaded, split = open_model_and_data(SAMPLES / f"{model}.safetensors",
                                            DataOptions(DATA / "clean", DATA / "eval"), Runtime("cpu"))
        trigger = parse_trigger(entry["trigger"])
        models = {"original": loaded.classifier(),
                  "clean_reference": load_model(SAMPLES / "clean.safetensors").classifier()}
        for method in ("sft", "ft"):
            outcome = run_defense(create_defense(method), loaded, split, [trigger],
                                  DefenseRun(target=entry["target"], history="off", probe="full"),
                                  device=device, gen=seed_everything(0))
            models[method] = outcome.classifier
        section = audit_sequela(models, tune=split.tune, heldout=split.heldout, probe=(trigger, entry["target"]),
                                device=device)
        mia = mia_pair(models, split.tune, split.heldout, device, seed=0)
        for role in models:
            reinj = section["reinjection"]["models"][role]
            row = {"attack": model, "model": role,
                   "mia_auc": mia[role]["best_auc"] if role in mia else None,
                   "tpr_at_1pct": mia[role]["attacks"][mia[role]["best_attack"]]["tpr_at_1pct_fpr"]
                   if role in mia else None,
                   "asr_start": reinj["initial_asr"], "asr_regained": reinj["final_asr"],
                   "steps_to_50": reinj["steps_to_regain"]}
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
